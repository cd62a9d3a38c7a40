// Model: algorithm.md's network as a sequence of backend ops. Shapes: R rows in a pass (tokens of
// one prefill chunk, or sequences of a decode step), N = R * H head rows.
#include "server/engine/model/model.h"

#include <algorithm>
#include <string>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

#include "base/status_macros.h"

namespace ps::engine {

using kernels::DeviceBuffer;
using kernels::LinearWeight;

struct Model::LayerParams {
  struct Level {  // learned sketch: LN -> Linear(in, 8r) -> GELU -> Linear(8r, r)
    DeviceBuffer norm_weight, norm_bias;
    std::unique_ptr<LinearWeight> up, down;
  };
  AttentionConfig attn;
  DeviceBuffer ln1_weight, ln1_bias, ln2_weight, ln2_bias;
  std::unique_ptr<LinearWeight> qkv, out, ffn_up, ffn_down;
  DeviceBuffer qk_norm_weight, qk_norm_bias;   // polynomial, random sketch: [h]
  std::unique_ptr<LinearWeight> s1, s2;        // random sketch: S^T [r, h]
  Level f1[2], f2[2];                          // learned sketch
  DeviceBuffer local_q_weight, local_q_bias;   // local_exact: [h]
  DeviceBuffer local_k_weight, local_k_bias;   // local_exact: [h]
  kernels::SketchAttentionShape sketch_shape;  // polysketch
  kernels::KvAttentionShape kv_shape;          // every other kind
};

struct Model::Scratch {
  DeviceBuffer x, xn, qkv, v, o;  // [R, D] ([R, 3D] for qkv)
  // q and k of a pass with `rows` rows, stacked: q [rows, D] then k [rows, D], so that the sketch
  // feature map runs once over both (half the ops, twice the rows per GEMM).
  DeviceBuffer qk;           // [2R, D]
  DeviceBuffer qn, kn;       // [N, h]: normalised q, k (polynomial, sketches, local)
  DeviceBuffer psi;          // [2N, r_max]: psi(q) rows, then psi(k) rows
  DeviceBuffer mlp_hidden;   // [2N, 8 r_max]: learned sketch hidden layer
  DeviceBuffer mlp_norm;     // [2N, max(h, r_max)]: learned sketch level input
  DeviceBuffer mlp_mid, f2;  // [2N, r_max]
  DeviceBuffer up, gated;    // [R, 2F], [R, F]
  DeviceBuffer logits;       // [R, V]
};

namespace {

absl::StatusOr<const HostTensor*> Find(const ModelWeights& weights, const std::string& name) {
  const HostTensor* tensor = weights.Find(name);
  if (tensor == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("model weights lack tensor \"", name, "\""));
  }
  return tensor;
}

absl::StatusOr<DeviceBuffer> Upload(kernels::Backend& backend, const ModelWeights& weights,
                                    const std::string& name) {
  PS_ASSIGN_OR_RETURN(const HostTensor* tensor, Find(weights, name));
  const int64_t bytes = static_cast<int64_t>(tensor->data.size() * sizeof(float));
  PS_ASSIGN_OR_RETURN(DeviceBuffer buffer, backend.Allocate(bytes));
  backend.CopyFromHost(tensor->data.data(), bytes, buffer.data());
  return buffer;
}

// A Linear weight [out, in] as stored (PyTorch layout), or, when `transpose`, a stored [in, out]
// matrix used as x M (the random sketch's S1, S2 [h, r]).
absl::StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(kernels::Backend& backend,
                                                            const ModelWeights& weights,
                                                            const std::string& name,
                                                            kernels::WeightDtype dtype,
                                                            bool transpose = false) {
  PS_ASSIGN_OR_RETURN(const HostTensor* tensor, Find(weights, name));
  if (tensor->shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is not a matrix"));
  }
  const int64_t rows = tensor->shape[0], cols = tensor->shape[1];
  if (!transpose) return backend.PrepareLinear(tensor->data, rows, cols, dtype);
  std::vector<float> t(tensor->data.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = tensor->data[i * cols + j];
  }
  return backend.PrepareLinear(t, cols, rows, dtype);
}

absl::StatusOr<DeviceBuffer> AllocateFloats(kernels::Backend& backend, int64_t count) {
  return backend.Allocate(count * static_cast<int64_t>(sizeof(float)));
}

// Whether `backend` runs layer `layer`'s attention: its refusal (Unimplemented, naming the limit)
// prefixed with the layer and the backend.
template <typename Shape>
absl::Status CheckBackendShape(const kernels::Backend& backend, size_t layer, const Shape& shape) {
  const absl::Status status = backend.CheckShape(shape);
  if (status.ok()) return status;
  return absl::Status(status.code(),
                      absl::StrCat("layer ", layer, ": the ", backend.name(),
                                   " backend cannot run this model: ", status.message()));
}

}  // namespace

Model::Model(ModelConfig config, kernels::Backend& backend, StatePool pool, ModelOptions options,
             int64_t max_context)
    : config_(std::move(config)),
      backend_(backend),
      pool_(std::move(pool)),
      options_(options),
      max_context_(max_context),
      slot_position_(static_cast<size_t>(pool_.num_slots()), -1),
      slot_stamp_(static_cast<size_t>(pool_.num_slots()), 0) {}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelWeights& weights,
                                                     kernels::Backend& backend,
                                                     const ModelOptions& options) {
  const ModelConfig& cfg = weights.config;
  PS_RETURN_IF_ERROR(cfg.Validate());
  if (options.num_slots < 1 || options.num_slots > kMaxStateSlots) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_slots: must be in [1, ", kMaxStateSlots, "], got ", options.num_slots));
  }
  if (options.max_batch < 1 || options.max_batch > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch: must be in [1, 4096], got ", options.max_batch));
  }
  if (options.prefill_chunk < 1 || options.prefill_chunk > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill_chunk: must be in [1, 65536], got ", options.prefill_chunk));
  }
  if (options.max_context < 0 || options.max_context > kUnlimitedContext) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_context: must be in [0, ", kUnlimitedContext, "], got ", options.max_context));
  }
  bool grows = false;  // some layer keeps a KV cache that grows with the context
  int64_t block = 1;   // largest local_exact block: prefill chunks are aligned to it
  int64_t r_max = 1;
  for (const AttentionConfig& attn : cfg.layers) {
    grows |= attn.kind != AttentionKind::kPolysketch && attn.kind != AttentionKind::kSlidingWindow;
    if (attn.local_exact) block = std::max(block, attn.block_size);
    r_max = std::max(r_max, attn.sketch_size);
  }
  int64_t max_context = options.max_context;
  if (max_context == 0) max_context = grows ? cfg.max_seq_len : kUnlimitedContext;
  ModelOptions opts = options;
  if (opts.prefill_chunk > block) opts.prefill_chunk = opts.prefill_chunk / block * block;

  PS_ASSIGN_OR_RETURN(StateLayout layout, StateLayout::Create(cfg, grows ? max_context : int64_t{0},
                                                              options.kv_cache_dtype));
  // Device backends keep the slots in their own memory; the CPU backend in plain host memory.
  PS_ASSIGN_OR_RETURN(StatePool pool,
                      StatePool::Create(std::move(layout), opts.num_slots,
                                        backend.host_memory() ? nullptr : &backend));
  std::unique_ptr<Model> model(new Model(cfg, backend, std::move(pool), opts, max_context));

  // Weights, in the backend's layout and the chosen format (one refusal before any conversion).
  const kernels::WeightDtype dtype = opts.weights_dtype;
  if (absl::Status status = backend.CheckWeightDtype(dtype); !status.ok()) {
    return absl::Status(
        status.code(),
        absl::StrCat("weights_dtype ", kernels::WeightDtypeName(dtype), ": ", status.message()));
  }
  PS_ASSIGN_OR_RETURN(model->embed_table_, Upload(backend, weights, "embed.weight"));
  PS_ASSIGN_OR_RETURN(model->embed_linear_, PrepareLinear(backend, weights, "embed.weight", dtype));
  PS_ASSIGN_OR_RETURN(model->logit_bias_, Upload(backend, weights, "logit_bias"));
  PS_ASSIGN_OR_RETURN(model->final_weight_, Upload(backend, weights, "final_norm.weight"));
  PS_ASSIGN_OR_RETURN(model->final_bias_, Upload(backend, weights, "final_norm.bias"));
  const int64_t H = cfg.n_heads, h = cfg.head_dim();
  model->layers_.resize(cfg.layers.size());
  for (size_t l = 0; l < cfg.layers.size(); ++l) {
    LayerParams& lp = model->layers_[l];
    const std::string p = absl::StrCat("blocks.", l, ".");
    lp.attn = cfg.layers[l];
    const bool polysketch = lp.attn.kind == AttentionKind::kPolysketch;
    // The attention shape first: a layer the backend cannot run is refused before any upload.
    if (polysketch) {
      lp.sketch_shape = {.heads = H,
                         .head_dim = h,
                         .sketch_size = lp.attn.sketch_size,
                         .local_exact = lp.attn.local_exact,
                         .block_size = lp.attn.block_size};
      PS_RETURN_IF_ERROR(CheckBackendShape(backend, l, lp.sketch_shape));
    } else {
      const bool ring = lp.attn.kind == AttentionKind::kSlidingWindow;
      lp.kv_shape = {
          .heads = H,
          .head_dim = h,
          .weighting = lp.attn.kind == AttentionKind::kPolynomial
                           ? kernels::KvWeighting::kPolynomial
                           : kernels::KvWeighting::kSoftmax,
          .mask = AttentionKeyMask(lp.attn),
          .ring = ring,
          .capacity =
              ring ? lp.attn.window : model->layout().layer(static_cast<int64_t>(l)).kv_capacity,
          .cache_dtype = options.kv_cache_dtype,
      };
      PS_RETURN_IF_ERROR(CheckBackendShape(backend, l, lp.kv_shape));
    }
    PS_ASSIGN_OR_RETURN(lp.ln1_weight, Upload(backend, weights, p + "ln1.weight"));
    PS_ASSIGN_OR_RETURN(lp.ln1_bias, Upload(backend, weights, p + "ln1.bias"));
    PS_ASSIGN_OR_RETURN(lp.ln2_weight, Upload(backend, weights, p + "ln2.weight"));
    PS_ASSIGN_OR_RETURN(lp.ln2_bias, Upload(backend, weights, p + "ln2.bias"));
    PS_ASSIGN_OR_RETURN(lp.qkv, PrepareLinear(backend, weights, p + "attn.qkv.weight", dtype));
    PS_ASSIGN_OR_RETURN(lp.out, PrepareLinear(backend, weights, p + "attn.out.weight", dtype));
    PS_ASSIGN_OR_RETURN(lp.ffn_up, PrepareLinear(backend, weights, p + "ffn.up.weight", dtype));
    PS_ASSIGN_OR_RETURN(lp.ffn_down, PrepareLinear(backend, weights, p + "ffn.down.weight", dtype));
    const bool random = polysketch && lp.attn.sketch == SketchKind::kRandom;
    if (lp.attn.kind == AttentionKind::kPolynomial || random) {
      PS_ASSIGN_OR_RETURN(lp.qk_norm_weight, Upload(backend, weights, p + "attn.qk_norm.weight"));
      PS_ASSIGN_OR_RETURN(lp.qk_norm_bias, Upload(backend, weights, p + "attn.qk_norm.bias"));
    }
    if (random) {
      PS_ASSIGN_OR_RETURN(lp.s1,
                          PrepareLinear(backend, weights, p + "attn.sketch.s1", dtype, true));
      PS_ASSIGN_OR_RETURN(lp.s2,
                          PrepareLinear(backend, weights, p + "attn.sketch.s2", dtype, true));
    }
    if (polysketch && lp.attn.sketch == SketchKind::kLearned) {
      for (int branch = 0; branch < 2; ++branch) {
        for (int level = 0; level < 2; ++level) {
          LayerParams::Level& lv = branch == 0 ? lp.f1[level] : lp.f2[level];
          const std::string q = absl::StrCat(p, "attn.sketch.f", branch + 1, ".", level, ".");
          PS_ASSIGN_OR_RETURN(lv.norm_weight, Upload(backend, weights, q + "norm.weight"));
          PS_ASSIGN_OR_RETURN(lv.norm_bias, Upload(backend, weights, q + "norm.bias"));
          PS_ASSIGN_OR_RETURN(lv.up, PrepareLinear(backend, weights, q + "up.weight", dtype));
          PS_ASSIGN_OR_RETURN(lv.down, PrepareLinear(backend, weights, q + "down.weight", dtype));
        }
      }
    }
    if (polysketch && lp.attn.local_exact) {
      PS_ASSIGN_OR_RETURN(lp.local_q_weight,
                          Upload(backend, weights, p + "attn.local_q_norm.weight"));
      PS_ASSIGN_OR_RETURN(lp.local_q_bias, Upload(backend, weights, p + "attn.local_q_norm.bias"));
      PS_ASSIGN_OR_RETURN(lp.local_k_weight,
                          Upload(backend, weights, p + "attn.local_k_norm.weight"));
      PS_ASSIGN_OR_RETURN(lp.local_k_bias, Upload(backend, weights, p + "attn.local_k_norm.bias"));
    }
  }

  // Activation buffers for the largest pass.
  const int64_t R = std::max(opts.prefill_chunk, opts.max_batch);
  const int64_t N = R * H, D = cfg.d_model, F = cfg.d_ff, V = cfg.vocab_size;
  model->max_rows_ = R;
  auto s = std::make_unique<Scratch>();
  for (DeviceBuffer* b : {&s->x, &s->xn, &s->v, &s->o, &s->qn, &s->kn}) {
    PS_ASSIGN_OR_RETURN(*b, AllocateFloats(backend, R * D));
  }
  PS_ASSIGN_OR_RETURN(s->qk, AllocateFloats(backend, 2 * R * D));
  PS_ASSIGN_OR_RETURN(s->qkv, AllocateFloats(backend, R * 3 * D));
  for (DeviceBuffer* b : {&s->psi, &s->mlp_mid, &s->f2}) {
    PS_ASSIGN_OR_RETURN(*b, AllocateFloats(backend, 2 * N * r_max));
  }
  PS_ASSIGN_OR_RETURN(s->mlp_hidden, AllocateFloats(backend, 2 * N * 8 * r_max));
  PS_ASSIGN_OR_RETURN(s->mlp_norm, AllocateFloats(backend, 2 * N * std::max(h, r_max)));
  PS_ASSIGN_OR_RETURN(s->up, AllocateFloats(backend, R * 2 * F));
  PS_ASSIGN_OR_RETURN(s->gated, AllocateFloats(backend, R * F));
  PS_ASSIGN_OR_RETURN(s->logits, AllocateFloats(backend, R * V));
  model->scratch_ = std::move(s);
  // The weight uploads are ops too.
  PS_RETURN_IF_ERROR(model->BackendStatus("loading the weights"));
  return model;
}

absl::StatusOr<SlotId> Model::AcquireSlot() {
  PS_ASSIGN_OR_RETURN(SlotId slot, pool_.Acquire());
  slot_position_[slot.index] = 0;
  return slot;
}

absl::Status Model::ReleaseSlot(SlotId slot) {
  PS_RETURN_IF_ERROR(pool_.Release(slot));
  slot_position_[slot.index] = -1;
  return absl::OkStatus();
}

absl::Status Model::CopySlot(SlotId from, SlotId to) {
  if (SlotPosition(from) < 0 || SlotPosition(to) < 0 || from == to) {
    return absl::InvalidArgumentError(absl::StrCat("CopySlot: slots ", from.index, " and ",
                                                   to.index, " must be distinct and acquired"));
  }
  const auto src = pool_.SlotBytes(from);
  backend_.Copy(src.data(), static_cast<int64_t>(src.size()), pool_.SlotBytes(to).data());
  PS_RETURN_IF_ERROR(BackendStatus("CopySlot"));
  slot_position_[to.index] = slot_position_[from.index];
  return absl::OkStatus();
}

absl::Status Model::SaveSlot(SlotId slot, StateSnapshot* snapshot) {
  if (SlotPosition(slot) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("SaveSlot: slot ", slot.index, " is not acquired"));
  }
  const auto src = pool_.SlotBytes(slot);
  snapshot->bytes.resize(src.size());
  if (!src.empty())
    backend_.CopyToHost(src.data(), static_cast<int64_t>(src.size()), snapshot->bytes.data());
  PS_RETURN_IF_ERROR(BackendStatus("SaveSlot"));
  snapshot->position = slot_position_[slot.index];
  return absl::OkStatus();
}

absl::Status Model::RestoreSlot(SlotId slot, const StateSnapshot& snapshot) {
  if (SlotPosition(slot) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("RestoreSlot: slot ", slot.index, " is not acquired"));
  }
  if (snapshot.position < 0 || snapshot.position > max_context_) {
    return absl::InvalidArgumentError(absl::StrCat("RestoreSlot: position ", snapshot.position,
                                                   " is outside [0, ", max_context_, "]"));
  }
  const auto dst = pool_.SlotBytes(slot);
  if (snapshot.bytes.empty()) {
    if (snapshot.position != 0) {
      return absl::InvalidArgumentError("RestoreSlot: an empty state must be at position 0");
    }
    if (!dst.empty()) backend_.Zero(dst.data(), static_cast<int64_t>(dst.size()));
  } else {
    if (snapshot.bytes.size() != dst.size()) {
      return absl::InvalidArgumentError(absl::StrCat("RestoreSlot: ", snapshot.bytes.size(),
                                                     " bytes, the slot has ", dst.size()));
    }
    backend_.CopyFromHost(snapshot.bytes.data(), static_cast<int64_t>(dst.size()), dst.data());
  }
  PS_RETURN_IF_ERROR(BackendStatus("RestoreSlot"));
  slot_position_[slot.index] = snapshot.position;
  return absl::OkStatus();
}

absl::Status Model::BackendStatus(absl::string_view what) {
  const absl::Status status = backend_.TakeStatus();
  if (status.ok()) return status;
  return absl::InternalError(absl::StrCat(what, ": the ", backend_.name(), " backend failed",
                                          backend_.failed() ? " (for good)" : "", ": ",
                                          status.message()));
}

int64_t Model::SlotPosition(SlotId slot) const {
  if (slot.index < 0 || slot.index >= pool_.num_slots()) return -1;
  return slot_position_[slot.index];
}

absl::Status Model::CheckTokens(absl::Span<const int32_t> tokens) const {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("tokens[", i, "]: ", tokens[i],
                                                     " is outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status Model::CheckSlot(SlotId slot, int64_t position) const {
  const int64_t held = SlotPosition(slot);
  if (held < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot ", slot.index, " is not acquired (use AcquireSlot)"));
  }
  if (held != position) {
    return absl::FailedPreconditionError(absl::StrCat(
        "slot ", slot.index, " holds ", held, " tokens, but the input is at position ", position));
  }
  return absl::OkStatus();
}

absl::Status Model::Prefill(SlotId slot, int64_t start, absl::Span<const int32_t> tokens,
                            absl::Span<float> last_logits, std::vector<float>* all_logits) {
  if (all_logits == nullptr) return PrefillChunks(slot, start, tokens, last_logits, nullptr);
  const int64_t V = config_.vocab_size;
  std::vector<float> all;
  all.resize(tokens.size() * static_cast<size_t>(V));
  const auto copy = [&all, V](int64_t first, int64_t rows, absl::Span<const float> logits) {
    std::copy_n(logits.data(), rows * V, all.data() + first * V);
  };
  const ChunkLogitsFn on_chunk = copy;
  PS_RETURN_IF_ERROR(PrefillChunks(slot, start, tokens, last_logits, &on_chunk));
  *all_logits = std::move(all);
  return absl::OkStatus();
}

absl::Status Model::Prefill(SlotId slot, int64_t start, absl::Span<const int32_t> tokens,
                            absl::Span<float> last_logits, ChunkLogitsFn on_chunk) {
  return PrefillChunks(slot, start, tokens, last_logits, &on_chunk);
}

absl::Status Model::PrefillChunks(SlotId slot, int64_t start, absl::Span<const int32_t> tokens,
                                  absl::Span<float> last_logits, const ChunkLogitsFn* on_chunk) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t V = config_.vocab_size;
  if (n == 0) return absl::InvalidArgumentError("prefill: no tokens");
  PS_RETURN_IF_ERROR(CheckSlot(slot, start));
  if (!last_logits.empty() && static_cast<int64_t>(last_logits.size()) != V) {
    return absl::InvalidArgumentError(
        absl::StrCat("last_logits: has ", last_logits.size(), " floats, the vocabulary ", V));
  }
  if (start + n > max_context_) {
    return absl::OutOfRangeError(absl::StrCat("prefill: positions up to ", start + n,
                                              " exceed the context limit ", max_context_));
  }
  PS_RETURN_IF_ERROR(CheckTokens(tokens));
  const int64_t chunk = options_.prefill_chunk;
  std::vector<int64_t> positions;
  const SlotId slots[1] = {slot};
  for (int64_t done = 0; done < n;) {
    const int64_t pos = start + done;
    // Chunks end at multiples of `chunk` (a multiple of every local_exact block), so that after
    // the first one every chunk starts on a block boundary.
    const int64_t rows = std::min(n - done, (pos / chunk + 1) * chunk - pos);
    positions.resize(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) positions[i] = pos + i;
    Forward(tokens.subspan(static_cast<size_t>(done), static_cast<size_t>(rows)), positions, slots,
            /*prefill=*/true);
    if (on_chunk != nullptr) {
      // rows <= chunk: the buffer never grows past prefill_chunk x V.
      chunk_logits_.resize(static_cast<size_t>(rows * V));
      Logits(0, rows, chunk_logits_.data());
      PS_RETURN_IF_ERROR(BackendStatus("prefill"));  // before anyone sees the logits
      (*on_chunk)(done, rows, chunk_logits_);
    }
    done += rows;
    if (done == n && !last_logits.empty()) Logits(rows - 1, 1, last_logits.data());
    PS_RETURN_IF_ERROR(BackendStatus("prefill"));  // once per forward pass
  }
  slot_position_[slot.index] = start + n;
  return absl::OkStatus();
}

absl::Status Model::Decode(absl::Span<const DecodeItem> items, absl::Span<float> logits) {
  const int64_t B = static_cast<int64_t>(items.size());
  const int64_t V = config_.vocab_size;
  if (B == 0 || B > options_.max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode: batch of ", B, " is not in [1, ", options_.max_batch, "]"));
  }
  if (static_cast<int64_t>(logits.size()) != B * V) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode: logits has ", logits.size(), " floats, need ", B, " x ", V));
  }
  ++decode_stamp_;  // marks this call's slots in slot_stamp_
  std::vector<int32_t> tokens(static_cast<size_t>(B));
  std::vector<int64_t> positions(static_cast<size_t>(B));
  std::vector<SlotId> slots(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    const DecodeItem& item = items[i];
    PS_RETURN_IF_ERROR(CheckSlot(item.slot, item.position));
    uint64_t& stamp = slot_stamp_[static_cast<size_t>(item.slot.index)];  // index checked above
    if (stamp == decode_stamp_) {
      return absl::InvalidArgumentError(
          absl::StrCat("decode: slot ", item.slot.index, " appears twice in one batch"));
    }
    stamp = decode_stamp_;
    if (item.position >= max_context_) {
      return absl::OutOfRangeError(absl::StrCat("decode: position ", item.position,
                                                " reaches the context limit ", max_context_));
    }
    tokens[i] = item.token;
    positions[i] = item.position;
    slots[i] = item.slot;
  }
  PS_RETURN_IF_ERROR(CheckTokens(tokens));
  Forward(tokens, positions, slots, /*prefill=*/false);
  Logits(0, B, logits.data());
  PS_RETURN_IF_ERROR(BackendStatus("decode"));
  for (const DecodeItem& item : items) slot_position_[item.slot.index] = item.position + 1;
  return absl::OkStatus();
}

void Model::Forward(absl::Span<const int32_t> tokens, absl::Span<const int64_t> positions,
                    absl::Span<const SlotId> slots, bool prefill) {
  Scratch& s = *scratch_;
  const int64_t R = static_cast<int64_t>(tokens.size());
  const int64_t D = config_.d_model, F = config_.d_ff, H = config_.n_heads;
  const float eps = static_cast<float>(config_.norm_eps);
  backend_.Embed(embed_table_.f32(), D, tokens, positions, config_.sinusoidal_embedding(),
                 s.x.f32());
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerParams& lp = layers_[l];
    backend_.LayerNorm(s.x.f32(), R, D, lp.ln1_weight.f32(), lp.ln1_bias.f32(), eps, s.xn.f32());
    backend_.Linear(s.xn.f32(), R, *lp.qkv, s.qkv.f32(), /*accumulate=*/false);
    backend_.SplitQkvRope(s.qkv.f32(), H, config_.head_dim(), positions, config_.rope_on_qk(),
                          s.qk.f32(), s.qk.f32() + R * D, s.v.f32());
    Attention(static_cast<int64_t>(l), R, positions, slots, prefill);
    backend_.Linear(s.o.f32(), R, *lp.out, s.x.f32(), /*accumulate=*/true);
    backend_.LayerNorm(s.x.f32(), R, D, lp.ln2_weight.f32(), lp.ln2_bias.f32(), eps, s.xn.f32());
    backend_.Linear(s.xn.f32(), R, *lp.ffn_up, s.up.f32(), /*accumulate=*/false);
    backend_.GeluGate(s.up.f32(), R, F, s.gated.f32());
    backend_.Linear(s.gated.f32(), R, *lp.ffn_down, s.x.f32(), /*accumulate=*/true);
  }
}

void Model::SketchFeatures(const LayerParams& lp, const float* x, int64_t rows, float* psi) {
  Scratch& s = *scratch_;
  const int64_t h = config_.head_dim(), r = lp.attn.sketch_size;
  const float eps = static_cast<float>(config_.norm_eps);
  if (lp.attn.sketch == SketchKind::kRandom) {
    // psi = (LN(x) S1) * (LN(x) S2)
    backend_.LayerNorm(x, rows, h, lp.qk_norm_weight.f32(), lp.qk_norm_bias.f32(), eps,
                       s.mlp_norm.f32());
    backend_.Linear(s.mlp_norm.f32(), rows, *lp.s1, psi, false);
    backend_.Linear(s.mlp_norm.f32(), rows, *lp.s2, s.f2.f32(), false);
    backend_.Multiply(psi, s.f2.f32(), rows * r, psi);
    return;
  }
  // Learned: two branches of two levels; f1 goes to psi, f2 to scratch, then combined.
  for (int branch = 0; branch < 2; ++branch) {
    const LayerParams::Level* levels = branch == 0 ? lp.f1 : lp.f2;
    float* result = branch == 0 ? psi : s.f2.f32();
    const float* in = x;
    int64_t width = h;
    for (int level = 0; level < 2; ++level) {
      const LayerParams::Level& lv = levels[level];
      backend_.LayerNorm(in, rows, width, lv.norm_weight.f32(), lv.norm_bias.f32(), eps,
                         s.mlp_norm.f32());
      backend_.Linear(s.mlp_norm.f32(), rows, *lv.up, s.mlp_hidden.f32(), false);
      backend_.Gelu(s.mlp_hidden.f32(), rows * 8 * r);
      float* out = level == 0 ? s.mlp_mid.f32() : result;
      backend_.Linear(s.mlp_hidden.f32(), rows, *lv.down, out, false);
      in = out;
      width = r;
    }
  }
  backend_.SketchCombine(psi, s.f2.f32(), rows, r, psi);
}

void Model::Attention(int64_t layer, int64_t rows, absl::Span<const int64_t> positions,
                      absl::Span<const SlotId> slots, bool prefill) {
  Scratch& s = *scratch_;
  const LayerParams& lp = layers_[static_cast<size_t>(layer)];
  const int64_t H = config_.n_heads, h = config_.head_dim(), N = rows * H;
  const float eps = static_cast<float>(config_.norm_eps);
  const float* q = s.qk.f32();  // [N, h]
  const float* k = q + N * h;   // [N, h]: the k rows follow the q rows (Forward)
  if (lp.attn.kind == AttentionKind::kPolysketch) {
    // q and k rows in one pass: psi(q) lands in the first N rows of psi, psi(k) in the next N.
    SketchFeatures(lp, q, 2 * N, s.psi.f32());
    const float* psi_q = s.psi.f32();
    const float* psi_k = psi_q + N * lp.attn.sketch_size;
    const float* q_local = nullptr;
    const float* k_local = nullptr;
    if (lp.attn.local_exact) {
      const float* q_in = q;
      const float* k_in = k;
      if (config_.rope_on_local_block(lp.attn)) {
        // "local_rope": only the local block sees position. Rotate into qn, kn and normalise
        // there in place; psi above read the unrotated q and k.
        backend_.Rope(q, H, h, positions, s.qn.f32());
        backend_.Rope(k, H, h, positions, s.kn.f32());
        q_in = s.qn.f32();
        k_in = s.kn.f32();
      }
      backend_.LayerNorm(q_in, N, h, lp.local_q_weight.f32(), lp.local_q_bias.f32(), eps,
                         s.qn.f32());
      backend_.LayerNorm(k_in, N, h, lp.local_k_weight.f32(), lp.local_k_bias.f32(), eps,
                         s.kn.f32());
      q_local = s.qn.f32();
      k_local = s.kn.f32();
    }
    sketch_slots_.clear();
    for (const SlotId slot : slots) {
      sketch_slots_.push_back({
          .sketch = pool_.Floats(slot, layer, StateComponent::kSketch).data(),
          .local_sketch = pool_.Floats(slot, layer, StateComponent::kLocalSketch).data(),
          .local_keys = pool_.Floats(slot, layer, StateComponent::kLocalKeys).data(),
          .local_values = pool_.Floats(slot, layer, StateComponent::kLocalValues).data(),
          .local_pending = pool_.Counter(slot, layer, StateComponent::kLocalPending),
      });
    }
    if (prefill) {
      backend_.SketchPrefill(lp.sketch_shape, positions[0], rows, sketch_slots_[0], psi_q, psi_k,
                             s.v.f32(), q_local, k_local, s.o.f32());
    } else {
      backend_.SketchDecode(lp.sketch_shape, positions, sketch_slots_, psi_q, psi_k, s.v.f32(),
                            q_local, k_local, s.o.f32());
    }
    return;
  }
  if (lp.attn.kind == AttentionKind::kPolynomial) {
    // One qk_norm LayerNorm shared by q, k and every head (algorithm.md section 2).
    backend_.LayerNorm(q, N, h, lp.qk_norm_weight.f32(), lp.qk_norm_bias.f32(), eps, s.qn.f32());
    backend_.LayerNorm(k, N, h, lp.qk_norm_weight.f32(), lp.qk_norm_bias.f32(), eps, s.kn.f32());
    q = s.qn.f32();
    k = s.kn.f32();
  }
  kv_slots_.clear();
  const bool ring = lp.kv_shape.ring;
  const StateComponent keys = ring ? StateComponent::kRingKeys : StateComponent::kKvKeys;
  const StateComponent values = ring ? StateComponent::kRingValues : StateComponent::kKvValues;
  const bool half = lp.kv_shape.cache_dtype == kernels::KvCacheDtype::kFp16;
  for (const SlotId slot : slots) {
    kernels::KvSlotState state{
        .positions =
            ring ? nullptr : pool_.Int64s(slot, layer, StateComponent::kKvPositions).data(),
        .count = pool_.Counter(slot, layer,
                               ring ? StateComponent::kRingCount : StateComponent::kKvCount),
    };
    if (half) {
      state.keys_f16 = pool_.Halves(slot, layer, keys).data();
      state.values_f16 = pool_.Halves(slot, layer, values).data();
    } else {
      state.keys = pool_.Floats(slot, layer, keys).data();
      state.values = pool_.Floats(slot, layer, values).data();
    }
    kv_slots_.push_back(state);
  }
  if (prefill) {
    backend_.KvPrefill(lp.kv_shape, positions[0], rows, kv_slots_[0], q, k, s.v.f32(), s.o.f32());
  } else {
    backend_.KvDecode(lp.kv_shape, positions, kv_slots_, q, k, s.v.f32(), s.o.f32());
  }
}

void Model::Logits(int64_t first, int64_t count, float* logits) {
  Scratch& s = *scratch_;
  const int64_t D = config_.d_model, V = config_.vocab_size;
  backend_.LayerNorm(s.x.f32() + first * D, count, D, final_weight_.f32(), final_bias_.f32(),
                     static_cast<float>(config_.norm_eps), s.xn.f32());
  backend_.Linear(s.xn.f32(), count, *embed_linear_, s.logits.f32(), false);
  backend_.AddBias(s.logits.f32(), count, V, logit_bias_.f32());
  backend_.CopyToHost(s.logits.data(), count * V * static_cast<int64_t>(sizeof(float)), logits);
}

int64_t Model::AttentionBytesAt(int64_t position) const {
  int64_t bytes = 0;
  for (int64_t l = 0; l < layout().num_layers(); ++l) {
    const LayerStateLayout& ll = layout().layer(l);
    if (!ll.needs_kv_cache) {
      bytes += ll.bytes();
      continue;
    }
    // A list cache: the kept rows (keys and values in the KV dtype, and their positions) plus the
    // row count.
    const int64_t kept =
        AttentionKeyMask(config_.layers[static_cast<size_t>(l)]).KeptAfter(position);
    bytes += kept * (ll.kv_bytes_per_token + 8) + 8;
  }
  return bytes;
}

}  // namespace ps::engine
