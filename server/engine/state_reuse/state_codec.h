// The byte format of an exported sequence state (the ExportState / ImportState RPCs): a header
// that says what the state is, the slot's bytes, and a checksum. Import trusts nothing: it checks
// the checksum, then that the state belongs to this very model (fingerprint of config and
// weights, attention kind of every layer, state size, dtype), then the contents themselves
// (ValidateStateBytes), because a checksum stops accidents, not someone who edits the bytes.
//
// Layout (little-endian):
//   "PSKSTATE"                       8 bytes, magic
//   u32 format_version               kStateFormatVersion
//   u64 model_fingerprint            ModelFingerprint of the exporting server's model
//   u32 num_layers, u8 kind[num_layers]   AttentionKind of each layer
//   u8  dtype                        0: fp32; 1: the KV-cache rows are binary16 (--kv_cache_dtype
//                                    fp16 on a model with KV layers; StateLayout::IsFp16)
//   i64 position                     tokens the state holds
//   u32 num_pending, i32 pending[num_pending]   tokens produced but not yet fed to the state
//   i64 state_bytes, state_bytes bytes          the slot (StateLayout::bytes_per_slot)
//   u64 checksum                     Fingerprint64 (XXH3, base/hash.h) of everything before it
//
// Version history: 1 (until issue 18): checksum and model fingerprint with a hash of this
// project's own; 2: with xxHash's XXH3; 3 (issue 19): a local_exact layer keeps its current
// block's sketched keys psi(k) [H, b, r] instead of the running sum S_cur [H, P, h+1], so its
// slot bytes mean something else, and the dtype byte may be 1 (fp16 KV caches); 4 (the lazy
// fold): a local_exact layer's int64 counter, 0 until then ("local_count"), is "local_pending",
// the previous block's rows not yet folded into S_prev, which may be above 0 after a block's
// first tokens. A version-3 state is a version-4 state with nothing pending, so it is read as
// one; a version-3 server refuses a version-4 state by its version, not as damaged. A state of
// version 1 or 2 is refused by name, before its checksum is read (a version-1 checksum could
// only fail), with both versions and what to do: export it again from a current server. A state
// is imported only by a server of the same dtype (FailedPrecondition naming both otherwise):
// converting would change the slot's size, and fp32 -> fp16 would change results silently, so a
// fleet sharing states (sessions, prefix tier) runs one --kv_cache_dtype.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_STATE_CODEC_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_STATE_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "server/engine/model/state_layout.h"
#include "server/engine/model/state_snapshot.h"
#include "server/engine/model_io/model_config.h"

namespace ps::engine {

inline constexpr uint32_t kStateFormatVersion = 4;
// The oldest format this server reads (version 3: the same bytes with no rows pending).
inline constexpr uint32_t kOldestStateFormatVersion = 3;
// The Fingerprint64 seed of the checksum.
inline constexpr uint64_t kStateChecksumSeed = 0x5053'4b53'5441'5445ULL;  // "PSKSTATE"
// Most pending tokens a state may carry (a finished turn leaves one).
inline constexpr int64_t kMaxPendingTokens = 64;

// A sequence as a session keeps it: its state, and the tokens it produced that the state has not
// seen yet (the last sampled token of a turn, fed first when the sequence continues).
struct SequenceState {
  StateSnapshot snapshot;
  std::vector<int32_t> pending;

  // Tokens the sequence holds in all: the position its next new token gets.
  int64_t length() const { return snapshot.position + static_cast<int64_t>(pending.size()); }
};

// What a state must match to be imported.
struct ModelIdentity {
  uint64_t fingerprint = 0;
  const ModelConfig* config = nullptr;  // not owned
  const StateLayout* layout = nullptr;  // not owned; StateLayout::Create(*config, max_context)
  int64_t max_context = 0;
};

std::string EncodeState(const SequenceState& state, const ModelIdentity& model);

// Decodes and validates. DataLoss for a truncated or corrupted state (bad magic, size or
// checksum, or contents ValidateStateBytes refuses); FailedPrecondition for a state of another
// model or format version (naming both values); InvalidArgument for pending tokens outside the
// vocabulary or a length past max_context.
[[nodiscard]] absl::StatusOr<SequenceState> DecodeState(absl::string_view bytes,
                                                        const ModelIdentity& model);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_STATE_CODEC_H_
