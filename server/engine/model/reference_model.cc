// ReferenceModel: train/model.py's decode_step, one token and one head at a time. Activations are
// fp32 vectors, every dot product accumulates in double, states are fp32 (algorithm.md section 5).
#include "server/engine/model/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

#include "base/status_macros.h"

namespace ps::engine {
namespace ref = ::ps::kernels::reference;

namespace {

// The span of tensor `name`, or InvalidArgument when the weights lack it.
absl::StatusOr<absl::Span<const float>> Get(const ModelWeights& weights, const std::string& name) {
  const HostTensor* tensor = weights.Find(name);
  if (tensor == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("model weights lack tensor \"", name, "\""));
  }
  return absl::Span<const float>(tensor->data);
}

absl::Status GetLevel(const ModelWeights& weights, const std::string& prefix,
                      ref::LearnedSketchLevel& level) {
  PS_ASSIGN_OR_RETURN(level.norm_weight, Get(weights, prefix + ".norm.weight"));
  PS_ASSIGN_OR_RETURN(level.norm_bias, Get(weights, prefix + ".norm.bias"));
  PS_ASSIGN_OR_RETURN(level.up, Get(weights, prefix + ".up.weight"));
  PS_ASSIGN_OR_RETURN(level.down, Get(weights, prefix + ".down.weight"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ReferenceModel> ReferenceModel::Create(ModelWeights weights) {
  ReferenceModel model(std::make_unique<const ModelWeights>(std::move(weights)));
  const ModelWeights& w = *model.weights_;
  PS_ASSIGN_OR_RETURN(model.embed_, Get(w, "embed.weight"));
  PS_ASSIGN_OR_RETURN(model.logit_bias_, Get(w, "logit_bias"));
  PS_ASSIGN_OR_RETURN(model.final_weight_, Get(w, "final_norm.weight"));
  PS_ASSIGN_OR_RETURN(model.final_bias_, Get(w, "final_norm.bias"));
  for (size_t l = 0; l < w.config.layers.size(); ++l) {
    const std::string p = absl::StrCat("blocks.", l, ".");
    LayerWeights lw;
    lw.attn = w.config.layers[l];
    PS_ASSIGN_OR_RETURN(lw.ln1_weight, Get(w, p + "ln1.weight"));
    PS_ASSIGN_OR_RETURN(lw.ln1_bias, Get(w, p + "ln1.bias"));
    PS_ASSIGN_OR_RETURN(lw.qkv, Get(w, p + "attn.qkv.weight"));
    PS_ASSIGN_OR_RETURN(lw.out, Get(w, p + "attn.out.weight"));
    PS_ASSIGN_OR_RETURN(lw.ln2_weight, Get(w, p + "ln2.weight"));
    PS_ASSIGN_OR_RETURN(lw.ln2_bias, Get(w, p + "ln2.bias"));
    PS_ASSIGN_OR_RETURN(lw.ffn_up, Get(w, p + "ffn.up.weight"));
    PS_ASSIGN_OR_RETURN(lw.ffn_down, Get(w, p + "ffn.down.weight"));
    const bool polysketch = lw.attn.kind == AttentionKind::kPolysketch;
    if (lw.attn.kind == AttentionKind::kPolynomial ||
        (polysketch && lw.attn.sketch == SketchKind::kRandom)) {
      PS_ASSIGN_OR_RETURN(lw.qk_norm_weight, Get(w, p + "attn.qk_norm.weight"));
      PS_ASSIGN_OR_RETURN(lw.qk_norm_bias, Get(w, p + "attn.qk_norm.bias"));
    }
    if (polysketch && lw.attn.sketch == SketchKind::kRandom) {
      PS_ASSIGN_OR_RETURN(lw.s1, Get(w, p + "attn.sketch.s1"));
      PS_ASSIGN_OR_RETURN(lw.s2, Get(w, p + "attn.sketch.s2"));
    }
    if (polysketch && lw.attn.sketch == SketchKind::kLearned) {
      for (int level = 0; level < 2; ++level) {
        PS_RETURN_IF_ERROR(
            GetLevel(w, absl::StrCat(p, "attn.sketch.f1.", level), lw.learned.f1[level]));
        PS_RETURN_IF_ERROR(
            GetLevel(w, absl::StrCat(p, "attn.sketch.f2.", level), lw.learned.f2[level]));
      }
    }
    if (polysketch && lw.attn.local_exact) {
      PS_ASSIGN_OR_RETURN(lw.local_q_weight, Get(w, p + "attn.local_q_norm.weight"));
      PS_ASSIGN_OR_RETURN(lw.local_q_bias, Get(w, p + "attn.local_q_norm.bias"));
      PS_ASSIGN_OR_RETURN(lw.local_k_weight, Get(w, p + "attn.local_k_norm.weight"));
      PS_ASSIGN_OR_RETURN(lw.local_k_bias, Get(w, p + "attn.local_k_norm.bias"));
    }
    model.layers_.push_back(lw);
  }
  return model;
}

ReferenceModel::Sequence ReferenceModel::NewSequence() const {
  const ModelConfig& cfg = config();
  Sequence seq;
  seq.layers.resize(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    const AttentionConfig& attn = layers_[l].attn;
    if (attn.kind != AttentionKind::kPolysketch) continue;
    const size_t size = static_cast<size_t>(cfg.n_heads) *
                        kernels::PackedSymmetricRows(attn.sketch_size) * (cfg.head_dim() + 1);
    seq.layers[l].s_prev.assign(size, 0.0f);
    if (attn.local_exact) seq.layers[l].s_cur.assign(size, 0.0f);
  }
  return seq;
}

void ReferenceModel::Psi(const LayerWeights& lw, absl::Span<const float> x, float* psi) const {
  if (lw.attn.sketch == SketchKind::kRandom) {
    ref::RandomSketchPsi(x, lw.qk_norm_weight, lw.qk_norm_bias, config().norm_eps, lw.s1, lw.s2,
                         psi);
  } else {
    ref::LearnedSketchPsi(x, lw.learned, config().norm_eps, psi);
  }
}

void ReferenceModel::AttendSketch(const LayerWeights& lw, int64_t t, absl::Span<const float> q,
                                  absl::Span<const float> k, absl::Span<const float> q_local,
                                  absl::Span<const float> k_local, absl::Span<const float> v,
                                  ReferenceLayerState& state, float* o) const {
  const int64_t H = config().n_heads;
  const size_t h = static_cast<size_t>(config().head_dim());
  const size_t r = static_cast<size_t>(lw.attn.sketch_size);
  const size_t head_state =
      static_cast<size_t>(kernels::PackedSymmetricRows(lw.attn.sketch_size)) * (h + 1);
  const double eps = config().norm_eps;
  const bool local = lw.attn.local_exact;
  if (local && t % lw.attn.block_size == 0 && t > 0) {
    // Fold the completed block into S_prev and start a new one (algorithm.md section 4).
    for (size_t i = 0; i < state.s_prev.size(); ++i) state.s_prev[i] += state.s_cur[i];
    std::fill(state.s_cur.begin(), state.s_cur.end(), 0.0f);
    state.local_keys.clear();
    state.local_values.clear();
  }
  std::vector<float> psi_q(r), psi_k(r), q_loc(h), k_loc(h);
  std::vector<double> u(h + 1);
  if (local) {
    // Append this token's (k~, v) for every head first: a token attends to itself.
    for (int64_t head = 0; head < H; ++head) {
      ref::LayerNorm(k_local.subspan(head * h, h), lw.local_k_weight, lw.local_k_bias, eps,
                     k_loc.data());
      state.local_keys.insert(state.local_keys.end(), k_loc.begin(), k_loc.end());
    }
    state.local_values.insert(state.local_values.end(), v.begin(), v.end());
  }
  for (int64_t head = 0; head < H; ++head) {
    const absl::Span<const float> qh = q.subspan(head * h, h);
    const absl::Span<const float> vh = v.subspan(head * h, h);
    Psi(lw, qh, psi_q.data());
    Psi(lw, k.subspan(head * h, h), psi_k.data());
    std::vector<float>& updated = local ? state.s_cur : state.s_prev;
    ref::SketchUpdate(psi_k, vh, absl::Span<float>(updated).subspan(head * head_state, head_state));
    ref::SketchReadout(psi_q,
                       absl::Span<const float>(state.s_prev).subspan(head * head_state, head_state),
                       absl::Span<double>(u));
    if (local) {
      ref::LayerNorm(q_local.subspan(head * h, h), lw.local_q_weight, lw.local_q_bias, eps,
                     q_loc.data());
      const size_t m = state.local_values.size() / (H * h);
      for (size_t j = 0; j < m; ++j) {
        const size_t offset = (j * H + head) * h;
        const double w = ref::Pow4(
            ref::Dot(q_loc, absl::Span<const float>(state.local_keys).subspan(offset, h)));
        for (size_t i = 0; i < h; ++i) u[i] += w * state.local_values[offset + i];
        u[h] += w;
      }
    }
    // The "1 +" is part of the trained function, not an epsilon (algorithm.md section 2).
    for (size_t i = 0; i < h; ++i) o[head * h + i] = static_cast<float>(u[i] / (1.0 + u[h]));
  }
}

void ReferenceModel::AttendKv(const LayerWeights& lw, int64_t t, absl::Span<const float> q,
                              absl::Span<const float> k, absl::Span<const float> v,
                              ReferenceLayerState& state, float* o) const {
  const int64_t H = config().n_heads;
  const size_t h = static_cast<size_t>(config().head_dim());
  const bool polynomial = lw.attn.kind == AttentionKind::kPolynomial;
  std::vector<float> qn(q.begin(), q.end());
  if (polynomial) {
    // The ONE qk_norm LayerNorm of the layer normalises q and k of every head.
    std::vector<float> kn(k.size());
    for (int64_t head = 0; head < H; ++head) {
      ref::LayerNorm(q.subspan(head * h, h), lw.qk_norm_weight, lw.qk_norm_bias, config().norm_eps,
                     qn.data() + head * h);
      ref::LayerNorm(k.subspan(head * h, h), lw.qk_norm_weight, lw.qk_norm_bias, config().norm_eps,
                     kn.data() + head * h);
    }
    state.kv_keys.insert(state.kv_keys.end(), kn.begin(), kn.end());
  } else {
    state.kv_keys.insert(state.kv_keys.end(), k.begin(), k.end());
  }
  state.kv_values.insert(state.kv_values.end(), v.begin(), v.end());
  state.kv_positions.push_back(t);
  // Drop what neither query t nor a later one sees (train/model.py _kv_prefill): under the
  // window and fixed kinds that is what t cannot see; softmax, polynomial and sparse_strided keep
  // every key. The loops below then skip the kept keys t does not see (sparse_strided).
  const kernels::KeyMask mask = AttentionKeyMask(lw.attn);
  size_t kept = 0;
  const size_t row = static_cast<size_t>(H) * h;
  for (size_t j = 0; j < state.kv_positions.size(); ++j) {
    if (!mask.Kept(t, state.kv_positions[j])) continue;
    if (kept != j) {
      state.kv_positions[kept] = state.kv_positions[j];
      std::copy_n(state.kv_keys.begin() + j * row, row, state.kv_keys.begin() + kept * row);
      std::copy_n(state.kv_values.begin() + j * row, row, state.kv_values.begin() + kept * row);
    }
    ++kept;
  }
  state.kv_positions.resize(kept);
  state.kv_keys.resize(kept * row);
  state.kv_values.resize(kept * row);
  std::vector<size_t> seen;  // kept rows query t attends to
  for (size_t j = 0; j < kept; ++j) {
    if (mask.Visible(t, state.kv_positions[j])) seen.push_back(j);
  }
  const size_t m = seen.size();
  const absl::Span<const float> keys(state.kv_keys);
  const absl::Span<const float> values(state.kv_values);
  const double scale = 1.0 / std::sqrt(static_cast<double>(h));
  std::vector<float> scores(m);
  for (int64_t head = 0; head < H; ++head) {
    const absl::Span<const float> qh = absl::Span<const float>(qn).subspan(head * h, h);
    std::vector<double> acc(h, 0.0);
    if (polynomial) {
      double denominator = 1.0;  // part of the trained function (algorithm.md section 2)
      for (size_t j = 0; j < m; ++j) {
        const size_t offset = (seen[j] * H + head) * h;
        const double w = ref::Pow4(ref::Dot(qh, keys.subspan(offset, h)));
        for (size_t i = 0; i < h; ++i) acc[i] += w * values[offset + i];
        denominator += w;
      }
      for (size_t i = 0; i < h; ++i) o[head * h + i] = static_cast<float>(acc[i] / denominator);
      continue;
    }
    for (size_t j = 0; j < m; ++j) {
      const size_t offset = (seen[j] * H + head) * h;
      scores[j] = static_cast<float>(ref::Dot(qh, keys.subspan(offset, h)) * scale);
    }
    ref::Softmax(absl::Span<float>(scores));
    for (size_t j = 0; j < m; ++j) {
      for (size_t i = 0; i < h; ++i)
        acc[i] += static_cast<double>(scores[j]) * values[(seen[j] * H + head) * h + i];
    }
    for (size_t i = 0; i < h; ++i) o[head * h + i] = static_cast<float>(acc[i]);
  }
}

void ReferenceModel::Attend(const LayerWeights& lw, int64_t t, absl::Span<const float> q,
                            absl::Span<const float> k, absl::Span<const float> q_local,
                            absl::Span<const float> k_local, absl::Span<const float> v,
                            ReferenceLayerState& state, float* o) const {
  if (lw.attn.kind == AttentionKind::kPolysketch) {
    AttendSketch(lw, t, q, k, q_local, k_local, v, state, o);
  } else {
    AttendKv(lw, t, q, k, v, state, o);
  }
}

absl::StatusOr<std::vector<float>> ReferenceModel::Step(Sequence& seq, int32_t token) const {
  const ModelConfig& cfg = config();
  const int64_t V = cfg.vocab_size;
  if (token < 0 || token >= V) {
    return absl::InvalidArgumentError(
        absl::StrCat("token: ", token, " is outside the vocabulary [0, ", V, ")"));
  }
  const size_t D = static_cast<size_t>(cfg.d_model);
  const size_t F = static_cast<size_t>(cfg.d_ff);
  const int64_t H = cfg.n_heads;
  const size_t h = static_cast<size_t>(cfg.head_dim());
  const double eps = cfg.norm_eps;
  const int64_t t = seq.position;

  // x = E[token] + pe(t), computed in double and stored fp32 (E[token] alone without the
  // absolute encoding).
  std::vector<double> pe(D, 0.0);
  if (cfg.sinusoidal_embedding()) ref::Sinusoidal(t, static_cast<int64_t>(D), pe.data());
  std::vector<float> x(D);
  for (size_t i = 0; i < D; ++i) x[i] = static_cast<float>(embed_[token * D + i] + pe[i]);

  std::vector<float> xn(D), qkv(3 * D), q_rot(D), k_rot(D), o(D), proj(D), up(2 * F), gated(F);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerWeights& lw = layers_[l];
    ref::LayerNorm(x, lw.ln1_weight, lw.ln1_bias, eps, xn.data());
    ref::MatVec(lw.qkv, xn, qkv.data());
    const absl::Span<const float> all(qkv);
    const bool rope_all = cfg.rope_on_qk();
    const bool rope_local = cfg.rope_on_local_block(lw.attn);
    if (rope_all || rope_local) {
      for (int64_t head = 0; head < H; ++head) {
        ref::Rope(all.subspan(head * h, h), t, q_rot.data() + head * h);
        ref::Rope(all.subspan(D + head * h, h), t, k_rot.data() + head * h);
      }
    }
    // q, k: what every path reads but the local block of a "local_rope" layer (rotated unless
    // "local_rope"); q_local, k_local: what that local block reads.
    const absl::Span<const float> q_plain = all.subspan(0, D), k_plain = all.subspan(D, D);
    const absl::Span<const float> q_all = rope_all ? absl::Span<const float>(q_rot) : q_plain;
    const absl::Span<const float> k_all = rope_all ? absl::Span<const float>(k_rot) : k_plain;
    const absl::Span<const float> q_local = rope_local ? absl::Span<const float>(q_rot) : q_all;
    const absl::Span<const float> k_local = rope_local ? absl::Span<const float>(k_rot) : k_all;
    Attend(lw, t, q_all, k_all, q_local, k_local, all.subspan(2 * D, D), seq.layers[l], o.data());
    ref::MatVec(lw.out, o, proj.data());
    for (size_t i = 0; i < D; ++i) x[i] += proj[i];

    ref::LayerNorm(x, lw.ln2_weight, lw.ln2_bias, eps, xn.data());
    ref::MatVec(lw.ffn_up, xn, up.data());  // [a | g]
    for (size_t i = 0; i < F; ++i) {
      gated[i] = static_cast<float>(static_cast<double>(up[i]) * ref::GeluTanh(up[F + i]));
    }
    ref::MatVec(lw.ffn_down, gated, proj.data());
    for (size_t i = 0; i < D; ++i) x[i] += proj[i];
  }

  ref::LayerNorm(x, final_weight_, final_bias_, eps, xn.data());
  std::vector<float> logits(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) {  // tied head: x E^T + bias
    logits[i] = static_cast<float>(ref::Dot(embed_.subspan(i * D, D), xn) + logit_bias_[i]);
  }
  seq.position = t + 1;
  return logits;
}

}  // namespace ps::engine
