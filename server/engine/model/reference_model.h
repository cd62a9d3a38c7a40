// ReferenceModel: the scalar, one-token-at-a-time implementation of the whole model function
// (algorithm.md sections 1, 2 and 4) on top of kernels/reference/. It is the engine's oracle:
// slow and obviously correct, checked end to end against the PyTorch golden fixtures, and the
// thing every fast backend's decode is compared with.
//
// Shape letters (algorithm.md): V vocab, D width, L layers, H heads, h = D/H head width, F FFN
// width, r sketch size, P = r(r+1)/2 packed sketch rows, b block size, m entries kept.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_REFERENCE_MODEL_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_REFERENCE_MODEL_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/types/span.h>

#include "kernels/reference/ops.h"
#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/weights.h"

namespace ps::engine {

// The decode state of one layer for one sequence. Which fields are used depends on the kind:
//   polysketch:            s_prev (and, with local_exact, s_cur and the local buffer);
//   every other kind:      the KV list (positions, keys, values).
// States are fp32 (algorithm.md section 5); all buffers are plain row-major vectors.
struct ReferenceLayerState {
  // polysketch: [H, P, h+1]. Plain sketch: the sum over all tokens so far; local_exact: over all
  // completed blocks (S_prev).
  std::vector<float> s_prev;
  // polysketch + local_exact: [H, P, h+1], the sum over the current block's tokens (S_cur).
  std::vector<float> s_cur;
  // polysketch + local_exact: the current block's m <= b tokens, k~ = local_k_norm(post-RoPE k)
  // and v, each [m, H, h].
  std::vector<float> local_keys;
  std::vector<float> local_values;
  // softmax, polynomial, sliding_window, sparse_*: the m kept tokens, exactly those some later
  // query can still see (train/model.py _kv_prefill): positions [m], keys and values [m, H, h].
  // Keys are post-RoPE (unrotated under "local_rope"), and qk_norm'ed for the polynomial kind.
  std::vector<int64_t> kv_positions;
  std::vector<float> kv_keys;
  std::vector<float> kv_values;
};

// Immutable after Create: a ReferenceModel may be shared by any number of threads, each stepping
// its own Sequences. Move-only (owns its weights; internal pointers stay valid across moves).
class ReferenceModel {
 public:
  // The state of one sequence: the next position and one ReferenceLayerState per layer. Plain
  // data that belongs to one caller (thread-compatible, not thread-safe); copy it to fork a
  // sequence. Create with ReferenceModel::NewSequence.
  struct Sequence {
    int64_t position = 0;  // the position the next Step consumes
    std::vector<ReferenceLayerState> layers;
  };

  // Builds a model from loaded weights (LoadWeights already checked the config and every
  // tensor's presence and shape; nothing is checked again). InvalidArgument only when a tensor
  // the config calls for is missing (possible for hand-built ModelWeights).
  [[nodiscard]] static absl::StatusOr<ReferenceModel> Create(ModelWeights weights);

  ReferenceModel(ReferenceModel&&) noexcept = default;
  ReferenceModel& operator=(ReferenceModel&&) noexcept = default;

  const ModelConfig& config() const { return weights_->config; }

  // A fresh sequence at position 0 (sketch states zero, buffers empty).
  Sequence NewSequence() const;

  // Feeds `token` at position seq.position through the whole network (recurrent decode,
  // algorithm.md section 4: states are updated first, so a token attends to itself), advances
  // seq.position, and returns the logits [V]. InvalidArgument naming the token when it is not in
  // [0, V); `seq` is then unchanged. `seq` must come from this model's NewSequence.
  [[nodiscard]] absl::StatusOr<std::vector<float>> Step(Sequence& seq, int32_t token) const;

 private:
  // Views into weights_ for one layer; spans of the sizes in docs/model-format.md.
  struct LayerWeights {
    AttentionConfig attn;
    absl::Span<const float> ln1_weight, ln1_bias;          // [D]
    absl::Span<const float> qkv;                           // [3D, D]
    absl::Span<const float> out;                           // [D, D]
    absl::Span<const float> ln2_weight, ln2_bias;          // [D]
    absl::Span<const float> ffn_up;                        // [2F, D]
    absl::Span<const float> ffn_down;                      // [D, F]
    absl::Span<const float> qk_norm_weight, qk_norm_bias;  // [h]: polynomial, random sketch
    absl::Span<const float> s1, s2;                        // [h, r]: random sketch
    kernels::reference::LearnedSketchWeights learned;      // learned sketch
    absl::Span<const float> local_q_weight, local_q_bias;  // [h]: local_exact
    absl::Span<const float> local_k_weight, local_k_bias;  // [h]: local_exact
  };

  explicit ReferenceModel(std::unique_ptr<const ModelWeights> weights)
      : weights_(std::move(weights)) {}

  // One layer's attention for the token at position t: q, k, v [H, h] -> o [H, h]. q and k are
  // what every path reads (post-RoPE, but unrotated under "local_rope"); q_local, k_local [H, h]
  // are what the exact local block of a local_exact layer reads before its norms: post-RoPE in
  // every mode (ModelConfig::rope_on_local_block), unread by other layers.
  void Attend(const LayerWeights& lw, int64_t t, absl::Span<const float> q,
              absl::Span<const float> k, absl::Span<const float> q_local,
              absl::Span<const float> k_local, absl::Span<const float> v,
              ReferenceLayerState& state, float* o) const;
  void AttendKv(const LayerWeights& lw, int64_t t, absl::Span<const float> q,
                absl::Span<const float> k, absl::Span<const float> v, ReferenceLayerState& state,
                float* o) const;
  void AttendSketch(const LayerWeights& lw, int64_t t, absl::Span<const float> q,
                    absl::Span<const float> k, absl::Span<const float> q_local,
                    absl::Span<const float> k_local, absl::Span<const float> v,
                    ReferenceLayerState& state, float* o) const;
  // psi of one head vector x [h] -> [r].
  void Psi(const LayerWeights& lw, absl::Span<const float> x, float* psi) const;

  std::unique_ptr<const ModelWeights> weights_;
  absl::Span<const float> embed_;                      // [V, D]
  absl::Span<const float> logit_bias_;                 // [V]
  absl::Span<const float> final_weight_, final_bias_;  // [D]
  std::vector<LayerWeights> layers_;                   // [L]
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_REFERENCE_MODEL_H_
