// The model function's shape: config.json of a model directory (docs/model-format.md), parsed and
// validated exactly as strictly as the Python reference (train/model.py ModelConfig.from_json and
// validate, train/modelio.py load_config), plus the derived sizes and the list of weights that a
// model with this config must carry.
//
// Shape letters (algorithm.md): V vocab_size, D d_model, L n_layers, H n_heads, h = D / H head
// width, F d_ff, r sketch_size, b block_size.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_IO_MODEL_CONFIG_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_IO_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "kernels/attention_mask.h"

namespace ps::engine {

// Version of the model directory format this reader implements.
inline constexpr int64_t kModelFormatVersion = 1;
// Every integer in a config is at most this, so that derived sizes (3D, 2F, 8r, products of two
// of them) never overflow int64_t. Far above any model this project can hold in memory.
inline constexpr int64_t kMaxConfigInt = (int64_t{1} << 31) - 1;
// config.json files larger than this are refused before parsing (a real one is < 2 KiB).
inline constexpr size_t kMaxConfigBytes = 16 << 20;

enum class AttentionKind {
  kSoftmax,
  kPolynomial,
  kPolysketch,
  kSlidingWindow,
  kSparseStrided,
  kSparseFixed,
};
// The JSON spelling: "softmax", "polynomial", "polysketch", "sliding_window", ...
absl::string_view AttentionKindName(AttentionKind kind);

enum class SketchKind {
  kNone,     // not a polysketch layer
  kRandom,   // fixed Gaussian S1, S2 [h, r] with a shared LayerNorm (qk_norm) in front
  kLearned,  // two 2-level MLP branches f1, f2
};
absl::string_view SketchKindName(SketchKind kind);  // "none", "random", "learned"

// Where position enters the network (config key "position_encoding"; train/model.py
// POSITION_ENCODINGS, algorithm.md section 1).
enum class PositionEncoding {
  // "sinusoidal+rope" (the default: what a config without the key computes): absolute sinusoidal
  // encodings added to the embedding, RoPE on q and k of every layer.
  kSinusoidalRope,
  // "rope": RoPE on q and k of every layer, no absolute encoding.
  kRope,
  // "local_rope": no absolute encoding; RoPE only on what the exact local-block weights of
  // polysketch local_exact layers read (q~ = local_q_norm(rope(q)), k~ = local_k_norm(rope(k))).
  // Every other path (the sketch psi(q), psi(k), also of local_exact layers; softmax,
  // polynomial, sliding-window and sparse kinds) sees q and k without rotation.
  kLocalRope,
};
// The JSON spelling: "sinusoidal+rope", "rope", "local_rope".
absl::string_view PositionEncodingName(PositionEncoding encoding);

// One layer's attention. A field that does not apply to `kind` holds its zero value (0, false,
// kNone); every integer that applies is >= 1, so 0 also means "not given" (block_size without
// local_exact).
struct AttentionConfig {
  AttentionKind kind = AttentionKind::kSoftmax;
  SketchKind sketch = SketchKind::kNone;  // polysketch only
  int64_t sketch_size = 0;                // polysketch: r
  bool local_exact = false;               // polysketch: exact degree-4 weights inside a block
  int64_t block_size = 0;  // polysketch: b; required with local_exact, else optional (0: none)
  int64_t window = 0;      // sliding_window, sparse_strided: w
  int64_t stride = 0;      // sparse_strided: s
  int64_t chunk = 0;       // sparse_fixed: c
  int64_t summary = 0;     // sparse_fixed: k_sum <= c

  friend bool operator==(const AttentionConfig&, const AttentionConfig&) = default;
};

// The key mask of a layer (kernels/attention_mask.h): which earlier positions a query sees under
// `attn` (causal for softmax, polynomial and polysketch; window / stride / chunk rules for the
// sliding-window and sparse kinds). train/model.py's allowed().
kernels::KeyMask AttentionKeyMask(const AttentionConfig& attn);

// The name and shape of one weight tensor a model must carry.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;

  friend bool operator==(const TensorSpec&, const TensorSpec&) = default;
};

// A validated model config (architecture "polysketchformer", byte tokenizer, format version 1;
// those are checked when parsing and not stored). Plain data: copy freely; thread-compatible.
struct ModelConfig {
  int64_t vocab_size = 0;   // V
  int64_t d_model = 0;      // D, even
  int64_t n_layers = 0;     // L == layers.size()
  int64_t n_heads = 0;      // H, divides D; h = D / H is even
  int64_t d_ff = 0;         // F (stored value, or floor(8D/3 / 8) * 8 when absent)
  int64_t max_seq_len = 0;  // training context; informational
  double norm_eps = 1e-5;   // LayerNorm epsilon, in (0, 1)
  std::vector<AttentionConfig> layers;
  // "f32", "f16", "bf16" or "" (absent). Informational: the safetensors header is authoritative.
  std::string torch_dtype;
  PositionEncoding position_encoding = PositionEncoding::kSinusoidalRope;

  int64_t head_dim() const { return d_model / n_heads; }  // h
  // Whether the embedding gets the absolute sinusoidal encoding added.
  bool sinusoidal_embedding() const {
    return position_encoding == PositionEncoding::kSinusoidalRope;
  }
  // Whether q and k of every layer are rotated (RoPE) before any attention reads them. When
  // false, q and k stay in the projection's own (interleaved) order.
  bool rope_on_qk() const { return position_encoding != PositionEncoding::kLocalRope; }
  // Whether layer `attn`'s local exact block reads RoPE'd q and k that nothing else of the layer
  // reads: polysketch local_exact layers under "local_rope".
  bool rope_on_local_block(const AttentionConfig& attn) const {
    return position_encoding == PositionEncoding::kLocalRope && attn.local_exact;
  }

  // Checks every value rule of docs/model-format.md (the same as train/model.py
  // ModelConfig.validate and AttentionConfig.validate): positive sizes up to kMaxConfigInt,
  // norm_eps in (0, 1), a known position_encoding, H divides D, D and h even, one layer entry per
  // layer, the fields each attention kind needs and none it does not, summary <= chunk. Returns
  // InvalidArgument naming the key, as "layers[2].window: must be a positive integer, got -3".
  // ParseModelConfig calls it; call it on configs built in code.
  [[nodiscard]] absl::Status Validate() const;

  // Every tensor a model directory with this config holds, in PyTorch state_dict order (the
  // table of docs/model-format.md, model.safetensors). Requires a valid config.
  std::vector<TensorSpec> ExpectedTensors() const;

  friend bool operator==(const ModelConfig&, const ModelConfig&) = default;
};

// Parses and validates the text of a config.json. `source` (usually the file's path) prefixes
// every error message. Errors, all InvalidArgument, name the key and the bad value:
//   "<source>: not valid JSON: ..."          (also: duplicate keys, byte order mark)
//   "<source>: d_model: required key is missing"
//   "<source>: dropout: unknown key"
//   "<source>: layers[1].window: must be a positive integer, got 2.0"
//   "<source>: layers[0].stride: does not apply to attention kind \"sliding_window\""
// Accepted top-level keys: those of ModelConfig plus architecture ("polysketchformer"),
// format_version (optional, must be 1), tokenizer (optional, must be {"type": "bytes"}),
// torch_dtype (optional, "f32" | "f16" | "bf16"), position_encoding (optional,
// "sinusoidal+rope" | "rope" | "local_rope"; absent: "sinusoidal+rope") and training (optional
// object, ignored).
// `layers` is required: the `attention` shorthand of training configs is refused here, as are
// JSON nulls for optional keys (no exporter writes them).
[[nodiscard]] absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                                           absl::string_view source);

// Reads and parses `<model_dir>/config.json`. NotFound when the file does not exist; otherwise
// the errors of ParseModelConfig (file larger than kMaxConfigBytes: InvalidArgument), each
// prefixed with the file's path.
[[nodiscard]] absl::StatusOr<ModelConfig> LoadModelConfig(absl::string_view model_dir);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_IO_MODEL_CONFIG_H_
