// A fixed pool of per-request state slots (StateLayout::bytes_per_slot bytes each), allocated
// once, so that admitting a request never allocates and a full server refuses cleanly with
// ResourceExhausted instead of running out of memory. Acquire and Release are O(1) bookkeeping
// (Acquire also zeroes the slot, O(bytes_per_slot)).
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_STATE_POOL_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_STATE_POOL_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/types/span.h>

#include "kernels/backend.h"
#include "server/engine/model/state_layout.h"

namespace ps::engine {

// Most slots a pool may hold (indices fit in int32_t; far above any real concurrency).
inline constexpr int64_t kMaxStateSlots = int64_t{1} << 24;

// Names one slot of a StatePool: index in [0, num_slots). Plain value; valid from Acquire until
// the matching Release.
struct SlotId {
  int32_t index = -1;
  friend bool operator==(const SlotId&, const SlotId&) = default;
};

// Thread-compatibility: engine thread only. No method is synchronised; the pool belongs to the
// single engine thread that schedules requests (the same thread acquires, uses and releases).
// Move-only; owns its memory (one kStateAlignment-aligned allocation of total_bytes()): host
// memory, or, when created with a `device` backend, backend memory (e.g. GPU memory) that the
// accessors below point into but that must only be read and written through that backend.
class StatePool {
 public:
  // A pool of `num_slots` slots of layout.bytes_per_slot() bytes each, all free.
  // InvalidArgument when num_slots is not in [1, kMaxStateSlots] or num_slots * bytes_per_slot
  // overflows; ResourceExhausted when the allocation fails. A layout with bytes_per_slot 0
  // (KV-cache-only model) gives a pool that only counts admissions and owns no memory.
  // With `device` (not null; must outlive the pool) the memory comes from device->Allocate and
  // Acquire zeroes a slot with device->Zero; the pool then never touches the bytes itself.
  [[nodiscard]] static absl::StatusOr<StatePool> Create(StateLayout layout, int64_t num_slots,
                                                        kernels::Backend* device = nullptr);

  // A pool of as many slots as fit in `budget_bytes`: floor(budget_bytes / bytes_per_slot),
  // capped at kMaxStateSlots. InvalidArgument when budget_bytes < 0 or the layout has
  // bytes_per_slot 0 (a budget cannot size it); ResourceExhausted naming both sizes when not one
  // slot fits, or when the allocation fails.
  [[nodiscard]] static absl::StatusOr<StatePool> CreateForBudget(
      StateLayout layout, int64_t budget_bytes, kernels::Backend* device = nullptr);

  StatePool(StatePool&&) = default;
  StatePool& operator=(StatePool&&) = default;
  StatePool(const StatePool&) = delete;
  StatePool& operator=(const StatePool&) = delete;

  // Takes a free slot and zeroes all of its bytes (an all-zero slot is the empty state of every
  // component: S = 0, counts 0). The most recently released slot is reused first (warm in cache).
  // ResourceExhausted "no free state slot (N of N in use)" when all are taken.
  [[nodiscard]] absl::StatusOr<SlotId> Acquire();

  // Returns `id` to the pool. InvalidArgument when id is out of range; FailedPrecondition when
  // the slot is not in use (double release). The pool is unchanged on error.
  [[nodiscard]] absl::Status Release(SlotId id);

  // True when `id` is in range and acquired.
  bool InUse(SlotId id) const;

  // Accessors. Precondition (checked by assert in debug builds only; these are on the decode hot
  // path): `id` is in use, `layer` is in [0, layout().num_layers()). Pointers stay valid for the
  // pool's lifetime; the contents belong to the request until Release.
  //
  // All bytes_per_slot() bytes of a slot; starts at a multiple of kStateAlignment. Empty when
  // bytes_per_slot() is 0.
  absl::Span<std::byte> SlotBytes(SlotId id);
  absl::Span<const std::byte> SlotBytes(SlotId id) const;
  // A float component of a layer (not IsInt64, not layout().IsFp16), shaped as StateComponent
  // documents; empty when the layer does not have it.
  absl::Span<float> Floats(SlotId id, int64_t layer, StateComponent component);
  absl::Span<const float> Floats(SlotId id, int64_t layer, StateComponent component) const;
  // A binary16 component (layout().IsFp16: KV-cache rows of an fp16 layout) as its bits; empty
  // when the layer does not have it.
  absl::Span<uint16_t> Halves(SlotId id, int64_t layer, StateComponent component);
  // A single counter (kLocalPending, kRingCount, kKvCount); nullptr when the layer does not have
  // it.
  int64_t* Counter(SlotId id, int64_t layer, StateComponent component);
  // Any int64_t component as an array (kKvPositions: [cap]; a counter: one element); empty when
  // the layer does not have it.
  absl::Span<int64_t> Int64s(SlotId id, int64_t layer, StateComponent component);
  absl::Span<const int64_t> Int64s(SlotId id, int64_t layer, StateComponent component) const;

  const StateLayout& layout() const { return layout_; }
  int64_t num_slots() const { return num_slots_; }
  int64_t num_free() const { return num_free_; }
  int64_t num_in_use() const { return num_slots_ - num_free_; }
  int64_t bytes_per_slot() const { return layout_.bytes_per_slot(); }
  int64_t total_bytes() const { return num_slots_ * layout_.bytes_per_slot(); }

 private:
  struct FreeDeleter {
    void operator()(std::byte* p) const { std::free(p); }
  };

  StatePool(StateLayout layout, int64_t num_slots, std::unique_ptr<std::byte[], FreeDeleter> data,
            kernels::DeviceBuffer device_data, kernels::Backend* device);
  std::byte* SlotData(SlotId id) const;
  std::byte* RegionData(SlotId id, int64_t layer, StateComponent component) const;

  StateLayout layout_;
  int64_t num_slots_ = 0;
  int64_t num_free_ = 0;
  std::unique_ptr<std::byte[], FreeDeleter> data_;  // num_slots * bytes_per_slot; null if 0
  kernels::DeviceBuffer device_data_;  // the same, in backend memory, when device_ is set
  kernels::Backend* device_ = nullptr;
  std::byte* base_ = nullptr;  // data_ or device_data_
  // Intrusive free stack: free_head_ is the top free slot (-1: none), next_free_[i] the free
  // slot below i.
  std::vector<int32_t> next_free_;
  int32_t free_head_ = -1;
  std::vector<bool> in_use_;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_STATE_POOL_H_
