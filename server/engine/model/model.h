// Model: the whole model function of algorithm.md on a kernels::Backend. It owns the weights in
// the backend's layout, the per-request state slots (StatePool) and the activation buffers, and
// runs the two things a scheduler needs:
//   * Prefill: a sequence's next tokens through every layer, in chunks of at most
//     prefill_chunk tokens (polysketch layers use the block algorithm inside a chunk, softmax and
//     sparse layers a tiled attention over their KV cache), so any prompt runs in bounded memory;
//   * Decode: one token for each of any number of sequences in one batch; projections are GEMMs
//     over the batch and every sequence reads and writes only its own slot.
// The model code only orchestrates backend ops (kernels/backend.h); a GPU backend runs it
// unchanged.
//
// Thread-compatibility: engine thread only (the backend and the state pool belong to it).
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_MODEL_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_MODEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include <absl/functional/function_ref.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include "kernels/backend.h"
#include "server/engine/model/state_layout.h"
#include "server/engine/model/state_pool.h"
#include "server/engine/model/state_snapshot.h"
#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/weights.h"

namespace ps::engine {

struct ModelOptions {
  // Concurrent sequences: state slots allocated once at Create.
  int64_t num_slots = 8;
  // Most sequences one Decode call advances.
  int64_t max_batch = 64;
  // Most tokens one prefill pass processes; longer prompts run in several passes. Rounded down to
  // a multiple of the model's local_exact block size when it is larger than one block.
  int64_t prefill_chunk = 512;
  // Most positions a sequence may reach: sizes the KV caches of softmax, polynomial and sparse
  // layers (kept in each slot). 0: the model's max_seq_len. Models whose layers all keep a
  // constant state (polysketch, sliding_window) accept any position below kUnlimitedContext
  // whatever this says, unless it is set explicitly.
  int64_t max_context = 0;
  // The precision every linear layer's weight is kept in (kernels/backend.h WeightDtype; issue
  // 19): converted once at Create. kFp32 keeps the golden-parity contract; ResolveWeightsDtype
  // (weights_dtype.h) turns the --weights_dtype flag into this.
  kernels::WeightDtype weights_dtype = kernels::WeightDtype::kFp32;
  // How the KV caches of softmax, polynomial, sliding_window and sparse layers store keys and
  // values (kernels/backend.h KvCacheDtype). kFp32 keeps the 1e-4 golden parity; kFp16 halves the
  // cache's bytes (slot size, and what a decode step streams) at binary16 rounding of k and v.
  // The servers' --kv_cache_dtype (kv_cache_dtype.h) chooses; Unimplemented at Create when the
  // backend cannot keep fp16 caches.
  kernels::KvCacheDtype kv_cache_dtype = kernels::KvCacheDtype::kFp32;
};

// Positions of constant-state models are limited only by this (2^40 tokens).
inline constexpr int64_t kUnlimitedContext = int64_t{1} << 40;

// One sequence's input to a decode step.
struct DecodeItem {
  SlotId slot;
  int64_t position = 0;  // the position of `token`: tokens already in the slot's state
  int32_t token = 0;
};

class Model {
 public:
  // Converts `weights` into `backend`'s layout and allocates the state pool and buffers.
  // InvalidArgument for options out of range (naming the option); ResourceExhausted when memory
  // cannot be had; Unimplemented (naming the layer, the backend and its limit) when the backend
  // cannot run a layer (Backend::CheckShape), or (naming weights_dtype and the backend) has no
  // weights in options.weights_dtype; InvalidArgument for an int8 weight that is not finite;
  // Internal when the backend failed while loading.
  // `backend` must outlive the model.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelWeights& weights,
                                                                     kernels::Backend& backend,
                                                                     const ModelOptions& options);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  const StateLayout& layout() const { return pool_.layout(); }
  const ModelOptions& options() const { return options_; }
  // The limit on positions: a sequence holds at most max_context() tokens.
  int64_t max_context() const { return max_context_; }
  // The state slots (read-only: take and return slots through AcquireSlot / ReleaseSlot, which
  // also track how many tokens each slot holds).
  const StatePool& pool() const { return pool_; }
  kernels::Backend& backend() { return backend_; }
  const kernels::Backend& backend() const { return backend_; }
  // True once the backend failed for good (Backend::failed): every later call that computes
  // fails too, and the state of every slot is unknown. The caller should stop serving.
  bool backend_failed() const { return backend_.failed(); }

  // Takes a free slot, zeroed (the empty state: position 0). ResourceExhausted when none is free.
  [[nodiscard]] absl::StatusOr<SlotId> AcquireSlot();
  // Returns a slot. InvalidArgument / FailedPrecondition as StatePool::Release.
  [[nodiscard]] absl::Status ReleaseSlot(SlotId slot);
  // Makes `to` an exact copy of `from` (state and position): forks a sequence. Both must be
  // acquired and distinct (InvalidArgument otherwise). The state copies below return Internal
  // when the backend fails (the destination then holds unknown values).
  [[nodiscard]] absl::Status CopySlot(SlotId from, SlotId to);
  // Copies the state of `slot` (acquired) and its position into host memory, reusing
  // snapshot->bytes' capacity. InvalidArgument when the slot is not acquired.
  [[nodiscard]] absl::Status SaveSlot(SlotId slot, StateSnapshot* snapshot);
  // Makes `slot` (acquired) hold `snapshot`: the state and position a SaveSlot of this model
  // gave (or ValidateStateBytes accepted); an empty snapshot.bytes is the empty state at
  // position 0. InvalidArgument when the slot is not acquired, the size is not the layout's or
  // the position is outside [0, max_context()]; the slot is unchanged then.
  [[nodiscard]] absl::Status RestoreSlot(SlotId slot, const StateSnapshot& snapshot);
  // Tokens the slot's state holds (the next position), or -1 when it is not acquired.
  int64_t SlotPosition(SlotId slot) const;

  // Feeds tokens[i] at position start + i into the state of `slot`, which must hold exactly the
  // `start` earlier tokens of the sequence (start == 0 after AcquireSlot; FailedPrecondition
  // otherwise, so that a state can never be fed out of order). Writes the logits of the
  // last token to last_logits [V] (may be empty to skip them) and, when all_logits is not null,
  // every token's logits [n, V] (slower: tests and evaluation). Errors, with nothing changed:
  // InvalidArgument for an empty prompt, a token outside [0, V) (naming its index), a slot not
  // in use or a wrong-sized last_logits; OutOfRange when start + n exceeds max_context().
  // Internal when the backend fails (Backend::TakeStatus, read after every chunk, before any
  // logits are handed out): the slot keeps its position, but its state is unknown, so the
  // sequence must end (release the slot: AcquireSlot zeroes it for the next one).
  [[nodiscard]] absl::Status Prefill(SlotId slot, int64_t start, absl::Span<const int32_t> tokens,
                                     absl::Span<float> last_logits,
                                     std::vector<float>* all_logits = nullptr);

  // Receives every token's logits of one prefill chunk: tokens [first, first + rows) of the
  // Prefill call's `tokens`, logits [rows, V] in host memory that stay valid during the call only
  // (the model's chunk buffer, reused by the next chunk).
  using ChunkLogitsFn =
      absl::FunctionRef<void(int64_t first, int64_t rows, absl::Span<const float> logits)>;
  // Prefill as above, calling `on_chunk` after each chunk with the logits of all its tokens
  // (prompt log-probabilities): host memory stays at most prefill_chunk x V floats
  // (chunk_logits_capacity()) whatever the number of tokens. Same errors, checked before any
  // chunk runs (on error `on_chunk` is never called).
  [[nodiscard]] absl::Status Prefill(SlotId slot, int64_t start, absl::Span<const int32_t> tokens,
                                     absl::Span<float> last_logits, ChunkLogitsFn on_chunk);
  // Floats the host buffer of every-token chunk logits holds now (0 until a Prefill with
  // on_chunk): at most options().prefill_chunk x V. For tests of the memory bound.
  int64_t chunk_logits_capacity() const { return static_cast<int64_t>(chunk_logits_.capacity()); }

  // One decode step for every item (each slot at most once): logits [B, V] row i for items[i].
  // Errors as for Prefill (plus InvalidArgument when B is 0 or above max_batch, or a slot
  // repeats); on a validation error no state changes. Internal when the backend fails: no
  // position advances, the states of every slot of the batch are unknown (end those sequences).
  [[nodiscard]] absl::Status Decode(absl::Span<const DecodeItem> items, absl::Span<float> logits);

  // Bytes of attention memory a sequence holds at `position` tokens: the constant state for
  // polysketch and sliding-window layers plus the KV-cache rows other layers keep at that point
  // (what the slot reserves for them at most: layout().bytes_per_slot()).
  int64_t AttentionBytesAt(int64_t position) const;

 private:
  struct LayerParams;
  struct Scratch;

  Model(ModelConfig config, kernels::Backend& backend, StatePool pool, ModelOptions options,
        int64_t max_context);

  // Both Prefill forms: `on_chunk` (may be null) sees every chunk's logits.
  absl::Status PrefillChunks(SlotId slot, int64_t start, absl::Span<const int32_t> tokens,
                             absl::Span<float> last_logits, const ChunkLogitsFn* on_chunk);
  absl::Status CheckTokens(absl::Span<const int32_t> tokens) const;
  // The backend's failure since the last check (Backend::TakeStatus) as Internal, prefixed with
  // `what` and the backend's name; OK when it ran.
  absl::Status BackendStatus(absl::string_view what);
  absl::Status CheckSlot(SlotId slot, int64_t position) const;
  // Runs rows through the network: prefill (one sequence, consecutive positions) when `prefill`
  // is set, else one decode step over `slots`. Leaves the final-norm input in scratch x.
  void Forward(absl::Span<const int32_t> tokens, absl::Span<const int64_t> positions,
               absl::Span<const SlotId> slots, bool prefill);
  void Attention(int64_t layer, int64_t rows, absl::Span<const int64_t> positions,
                 absl::Span<const SlotId> slots, bool prefill);
  // psi of `rows` head vectors x [rows, h] into psi [rows, r].
  void SketchFeatures(const LayerParams& lp, const float* x, int64_t rows, float* psi);
  // Final norm and logits of rows [first, first + count) of scratch x into host `logits`.
  void Logits(int64_t first, int64_t count, float* logits);

  ModelConfig config_;
  kernels::Backend& backend_;
  StatePool pool_;
  ModelOptions options_;
  int64_t max_context_ = 0;
  int64_t max_rows_ = 0;  // max(prefill_chunk, max_batch): rows the scratch buffers hold
  std::vector<int64_t> slot_position_;  // per slot: tokens held, -1 when free
  // Repeated-slot check of Decode without allocating: slot_stamp_[i] == decode_stamp_ when slot
  // i is already in the current call's batch.
  std::vector<uint64_t> slot_stamp_;
  uint64_t decode_stamp_ = 0;
  std::vector<LayerParams> layers_;
  std::vector<kernels::SketchSlotState> sketch_slots_;  // per-call views, reused
  std::vector<kernels::KvSlotState> kv_slots_;
  std::unique_ptr<Scratch> scratch_;
  std::vector<float> chunk_logits_;    // [rows, V] host copy of one chunk's logits (on_chunk)
  kernels::DeviceBuffer embed_table_;  // [V, D]
  std::unique_ptr<kernels::LinearWeight> embed_linear_;
  kernels::DeviceBuffer logit_bias_, final_weight_, final_bias_;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_MODEL_H_
