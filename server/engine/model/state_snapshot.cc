#include "server/engine/model/state_snapshot.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#include <absl/strings/str_cat.h>

namespace ps::engine {
namespace {

int64_t ReadInt64(absl::Span<const std::byte> bytes, int64_t offset) {
  int64_t v;
  std::memcpy(&v, bytes.data() + offset, sizeof(v));
  return v;
}

absl::Status Corrupt(int64_t layer, StateComponent component, absl::string_view what) {
  return absl::DataLossError(
      absl::StrCat("state: layer ", layer, " ", StateComponentName(component), ": ", what));
}

}  // namespace

absl::Status ValidateStateBytes(const ModelConfig& config, const StateLayout& layout,
                                int64_t position, int64_t max_context,
                                absl::Span<const std::byte> bytes) {
  if (static_cast<int64_t>(bytes.size()) != layout.bytes_per_slot()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "state: ", bytes.size(), " bytes, but this model's state has ", layout.bytes_per_slot()));
  }
  if (position < 0 || position > max_context) {
    return absl::InvalidArgumentError(
        absl::StrCat("state: position ", position, " is outside [0, ", max_context, "]"));
  }
  for (int64_t l = 0; l < layout.num_layers(); ++l) {
    const LayerStateLayout& layer = layout.layer(l);
    const kernels::KeyMask mask = AttentionKeyMask(config.layers[static_cast<size_t>(l)]);
    for (int c = 0; c < kNumStateComponents; ++c) {
      const auto component = static_cast<StateComponent>(c);
      const StateRegion& region = layer.region(component);
      if (!region.present()) continue;
      if (layout.IsFp16(component)) {
        // binary16: exponent all ones is an infinity or NaN.
        const int64_t n = region.size_bytes / 2;
        for (int64_t i = 0; i < n; ++i) {
          uint16_t v;
          std::memcpy(&v, bytes.data() + region.offset_bytes + i * 2, sizeof(v));
          if ((v & 0x7c00u) == 0x7c00u) {
            return Corrupt(l, component, "holds a value that is not finite");
          }
        }
        continue;
      }
      if (!IsInt64(component)) {
        const int64_t n = region.size_bytes / static_cast<int64_t>(sizeof(float));
        for (int64_t i = 0; i < n; ++i) {
          float v;
          std::memcpy(&v, bytes.data() + region.offset_bytes + i * 4, sizeof(v));
          if (!std::isfinite(v)) return Corrupt(l, component, "holds a value that is not finite");
        }
        continue;
      }
      switch (component) {
        case StateComponent::kLocalPending: {
          // Rows of the previous block not yet folded: only after a block's first token (the
          // first block has no previous one), and never a row the current block has written.
          const int64_t pending = ReadInt64(bytes, region.offset_bytes);
          const int64_t b = layer.local_size;
          const int64_t written = position % b;
          const int64_t most = position > b && written > 0 ? b - written : 0;
          if (pending < 0 || pending > most) {
            return Corrupt(l, component,
                           absl::StrCat("is ", pending, ", but a state at position ", position,
                                        " (block of ", b, ") holds 0..", most, " pending rows"));
          }
          break;
        }
        case StateComponent::kRingCount:
          if (ReadInt64(bytes, region.offset_bytes) != position) {
            return Corrupt(l, component,
                           absl::StrCat("is ", ReadInt64(bytes, region.offset_bytes),
                                        ", but the state is at position ", position));
          }
          break;
        case StateComponent::kKvCount: {
          const int64_t count = ReadInt64(bytes, region.offset_bytes);
          const int64_t want = mask.KeptAfter(position);
          if (count != want || count > layer.kv_capacity) {
            return Corrupt(l, component,
                           absl::StrCat("is ", count, ", but position ", position, " keeps ", want,
                                        " rows (capacity ", layer.kv_capacity, ")"));
          }
          // The kept positions: ascending, each still kept after the last position (KeyMask::Kept:
          // what it or a later query sees). With the count equal to KeptAfter, that makes them
          // exactly the rows the kernels would keep.
          const StateRegion& rows = layer.region(StateComponent::kKvPositions);
          int64_t previous = -1;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t p = ReadInt64(bytes, rows.offset_bytes + i * 8);
            if (p <= previous || p >= position || !mask.Kept(position - 1, p)) {
              return Corrupt(
                  l, StateComponent::kKvPositions,
                  absl::StrCat("row ", i, " holds position ", p, ", which a cache at position ",
                               position, " cannot keep there"));
            }
            previous = p;
          }
          break;
        }
        default:
          break;  // kKvPositions: checked with kKvCount
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace ps::engine
