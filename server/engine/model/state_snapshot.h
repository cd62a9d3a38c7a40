// A copy of one sequence's state slot in host memory: what the prefix cache, sessions and state
// export keep of a request after its slot is gone (or while it runs elsewhere). Because a slot
// holds everything the model needs to continue a sequence (the sketch state, the local block
// buffer of local_exact layers with its sketched keys, sliding-window rings, KV caches and their
// counters), restoring a snapshot into any free slot continues the sequence exactly as if it had
// never left.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_STATE_SNAPSHOT_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_STATE_SNAPSHOT_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include <absl/status/status.h>
#include <absl/types/span.h>

#include "server/engine/model/state_layout.h"
#include "server/engine/model_io/model_config.h"

namespace ps::engine {

struct StateSnapshot {
  // Tokens the state holds: the position of the next token fed to it.
  int64_t position = 0;
  // The slot's bytes (StateLayout::bytes_per_slot()). Empty means the empty state (an all-zero
  // slot), which needs no copy.
  std::vector<std::byte> bytes;

  int64_t size_bytes() const { return static_cast<int64_t>(bytes.size()); }
};

// Checks that `bytes` (one slot of `layout`) is a state a sequence can be at after `position`
// tokens, as far as the kernels' indexing depends on it, so that bytes from outside (an imported
// state) can never make a kernel read or write out of bounds: every counter equals what the
// position implies (ring: tokens written; KV list: KeyMask::KeptAfter(position) rows), the kept
// KV positions ascend and are all kept after position - 1 (KeyMask::Kept), and every float is
// finite.
// DataLoss naming the layer and component otherwise; InvalidArgument for a size that is not the
// layout's bytes_per_slot or a position outside [0, max_context].
// `layout` must be StateLayout::Create(config, max_context) of the model.
[[nodiscard]] absl::Status ValidateStateBytes(const ModelConfig& config, const StateLayout& layout,
                                              int64_t position, int64_t max_context,
                                              absl::Span<const std::byte> bytes);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_STATE_SNAPSHOT_H_
