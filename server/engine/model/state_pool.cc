// StatePool: one aligned allocation carved into slots, a LIFO free stack of indices and an
// in-use bitmap, so that Release can refuse a double release instead of corrupting the stack.
#include "server/engine/model/state_pool.h"

#include <cstring>
#include <limits>
#include <utility>

#include <absl/strings/str_cat.h>

#include "base/check.h"

namespace ps::engine {

StatePool::StatePool(StateLayout layout, int64_t num_slots,
                     std::unique_ptr<std::byte[], FreeDeleter> data,
                     kernels::DeviceBuffer device_data, kernels::Backend* device)
    : layout_(std::move(layout)),
      num_slots_(num_slots),
      num_free_(num_slots),
      data_(std::move(data)),
      device_data_(std::move(device_data)),
      device_(device),
      base_(device != nullptr ? static_cast<std::byte*>(device_data_.data()) : data_.get()),
      next_free_(static_cast<size_t>(num_slots)),
      free_head_(0),
      in_use_(static_cast<size_t>(num_slots), false) {
  // Slot 0 on top, so a fresh pool hands out 0, 1, 2, ...
  for (int64_t i = 0; i < num_slots; ++i) {
    next_free_[i] = i + 1 < num_slots ? static_cast<int32_t>(i + 1) : -1;
  }
}

absl::StatusOr<StatePool> StatePool::Create(StateLayout layout, int64_t num_slots,
                                            kernels::Backend* device) {
  if (num_slots < 1 || num_slots > kMaxStateSlots) {
    return absl::InvalidArgumentError(absl::StrCat("state pool: num_slots must be in [1, ",
                                                   kMaxStateSlots, "], got ", num_slots));
  }
  const int64_t slot_bytes = layout.bytes_per_slot();
  int64_t total = 0;
  if (__builtin_mul_overflow(num_slots, slot_bytes, &total) ||
      static_cast<uint64_t>(total) > std::numeric_limits<size_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("state pool: ", num_slots, " slots x ",
                                                   slot_bytes, " bytes overflows the size type"));
  }
  std::unique_ptr<std::byte[], FreeDeleter> data;
  if (total > 0 && device != nullptr) {
    // Backend memory (aligned to at least 64 bytes == kStateAlignment, as DeviceBuffer promises).
    absl::StatusOr<kernels::DeviceBuffer> buffer = device->Allocate(total);
    if (!buffer.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "state pool: cannot allocate ", total, " bytes of ", device->name(), " memory (",
          num_slots, " slots x ", slot_bytes, " bytes): ", buffer.status().message()));
    }
    return StatePool(std::move(layout), num_slots, nullptr, *std::move(buffer), device);
  }
  if (total > 0) {
    // total is a multiple of kStateAlignment (every slot is), as aligned_alloc requires.
    data.reset(static_cast<std::byte*>(
        std::aligned_alloc(static_cast<size_t>(kStateAlignment), static_cast<size_t>(total))));
    if (data == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("state pool: cannot allocate ", total,
                                                       " bytes (", num_slots, " slots x ",
                                                       slot_bytes, " bytes)"));
    }
  }
  return StatePool(std::move(layout), num_slots, std::move(data), kernels::DeviceBuffer(), nullptr);
}

absl::StatusOr<StatePool> StatePool::CreateForBudget(StateLayout layout, int64_t budget_bytes,
                                                     kernels::Backend* device) {
  if (budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("state pool: budget must be >= 0 bytes, got ", budget_bytes));
  }
  const int64_t slot_bytes = layout.bytes_per_slot();
  if (slot_bytes == 0) {
    return absl::InvalidArgumentError(
        "state pool: the model keeps no constant-size state (bytes_per_slot is 0), so a byte "
        "budget cannot size the pool; give the number of slots instead");
  }
  const int64_t num_slots = budget_bytes / slot_bytes;
  if (num_slots == 0) {
    return absl::ResourceExhaustedError(absl::StrCat("state pool: a budget of ", budget_bytes,
                                                     " bytes holds no state slot; one slot needs ",
                                                     slot_bytes, " bytes"));
  }
  return Create(std::move(layout), num_slots < kMaxStateSlots ? num_slots : kMaxStateSlots, device);
}

absl::StatusOr<SlotId> StatePool::Acquire() {
  if (free_head_ < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no free state slot (", num_in_use(), " of ", num_slots_, " in use)"));
  }
  const SlotId id{free_head_};
  free_head_ = next_free_[id.index];
  next_free_[id.index] = -1;
  in_use_[id.index] = true;
  --num_free_;
  if (base_ != nullptr) {
    if (device_ != nullptr) {
      device_->Zero(SlotData(id), bytes_per_slot());
    } else {
      std::memset(SlotData(id), 0, static_cast<size_t>(bytes_per_slot()));
    }
  }
  return id;
}

absl::Status StatePool::Release(SlotId id) {
  if (id.index < 0 || id.index >= num_slots_) {
    return absl::InvalidArgumentError(
        absl::StrCat("state slot ", id.index, " is out of range [0, ", num_slots_, ")"));
  }
  if (!in_use_[id.index]) {
    return absl::FailedPreconditionError(
        absl::StrCat("state slot ", id.index, " is not in use (released twice?)"));
  }
  in_use_[id.index] = false;
  next_free_[id.index] = free_head_;
  free_head_ = id.index;
  ++num_free_;
  return absl::OkStatus();
}

bool StatePool::InUse(SlotId id) const {
  return id.index >= 0 && id.index < num_slots_ && in_use_[id.index];
}

std::byte* StatePool::SlotData(SlotId id) const {
  PS_DCHECK(InUse(id));
  if (base_ == nullptr) return nullptr;
  return base_ + static_cast<size_t>(id.index) * static_cast<size_t>(bytes_per_slot());
}

std::byte* StatePool::RegionData(SlotId id, int64_t layer, StateComponent component) const {
  PS_DCHECK(layer >= 0 && layer < layout_.num_layers());
  const StateRegion& region = layout_.layer(layer).region(component);
  if (!region.present()) return nullptr;
  return SlotData(id) + region.offset_bytes;
}

absl::Span<std::byte> StatePool::SlotBytes(SlotId id) {
  return {SlotData(id), static_cast<size_t>(bytes_per_slot())};
}

absl::Span<const std::byte> StatePool::SlotBytes(SlotId id) const {
  return {SlotData(id), static_cast<size_t>(bytes_per_slot())};
}

absl::Span<uint16_t> StatePool::Halves(SlotId id, int64_t layer, StateComponent component) {
  PS_DCHECK(layout_.IsFp16(component));
  std::byte* data = RegionData(id, layer, component);
  if (data == nullptr) return {};
  const size_t size =
      static_cast<size_t>(layout_.layer(layer).region(component).size_bytes) / sizeof(uint16_t);
  return {reinterpret_cast<uint16_t*>(data), size};
}

absl::Span<float> StatePool::Floats(SlotId id, int64_t layer, StateComponent component) {
  PS_DCHECK(!IsInt64(component) && !layout_.IsFp16(component));
  std::byte* data = RegionData(id, layer, component);
  if (data == nullptr) return {};
  const size_t size =
      static_cast<size_t>(layout_.layer(layer).region(component).size_bytes) / sizeof(float);
  return {reinterpret_cast<float*>(data), size};
}

absl::Span<const float> StatePool::Floats(SlotId id, int64_t layer,
                                          StateComponent component) const {
  PS_DCHECK(!IsInt64(component) && !layout_.IsFp16(component));
  const std::byte* data = RegionData(id, layer, component);
  if (data == nullptr) return {};
  const size_t size =
      static_cast<size_t>(layout_.layer(layer).region(component).size_bytes) / sizeof(float);
  return {reinterpret_cast<const float*>(data), size};
}

int64_t* StatePool::Counter(SlotId id, int64_t layer, StateComponent component) {
  PS_DCHECK(IsInt64(component) && component != StateComponent::kKvPositions);
  return reinterpret_cast<int64_t*>(RegionData(id, layer, component));
}

absl::Span<int64_t> StatePool::Int64s(SlotId id, int64_t layer, StateComponent component) {
  PS_DCHECK(IsInt64(component));
  std::byte* data = RegionData(id, layer, component);
  if (data == nullptr) return {};
  const size_t size =
      static_cast<size_t>(layout_.layer(layer).region(component).size_bytes) / sizeof(int64_t);
  return {reinterpret_cast<int64_t*>(data), size};
}

absl::Span<const int64_t> StatePool::Int64s(SlotId id, int64_t layer,
                                            StateComponent component) const {
  PS_DCHECK(IsInt64(component));
  const std::byte* data = RegionData(id, layer, component);
  if (data == nullptr) return {};
  const size_t size =
      static_cast<size_t>(layout_.layer(layer).region(component).size_bytes) / sizeof(int64_t);
  return {reinterpret_cast<const int64_t*>(data), size};
}

}  // namespace ps::engine
