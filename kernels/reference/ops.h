// Scalar reference ("oracle") versions of every op of the model function (algorithm.md sections 1,
// 2 and 4): plain loops, double accumulation, no SIMD. Every fast backend (kernels/cpu/,
// kernels/cuda/) is tested against these; the engine's ReferenceModel is built from them. They
// know nothing about models, weights files or requests: inputs are spans of floats.
//
// Shape letters (algorithm.md): n vector length, D model width, h head width, r sketch size,
// P = r(r+1)/2 packed sketch rows, in/out the two sides of a linear layer. A buffer comment
// `[a, b]` means row-major with b contiguous. All float buffers are fp32; sums run in double and
// are rounded to fp32 once, when stored. Preconditions on sizes are the caller's (our own
// invariants): they are checked with PS_DCHECK (base/check.h), on in the sanitizer and fuzz
// builds.
#ifndef POLYSKETCH_KERNELS_REFERENCE_OPS_H_
#define POLYSKETCH_KERNELS_REFERENCE_OPS_H_

#include <cstdint>

#include <absl/types/span.h>

#include "kernels/packed_index.h"

namespace ps::kernels::reference {

// y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, var the biased variance (PyTorch's
// nn.LayerNorm). x, weight, bias, y: [n]. y may alias x.
void LayerNorm(absl::Span<const float> x, absl::Span<const float> weight,
               absl::Span<const float> bias, double eps, float* y);

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in double.
double GeluTanh(double x);

// x^4 as (x*x)*(x*x): integer powers only (algorithm.md section 2).
constexpr double Pow4(double x) {
  const double x2 = x * x;
  return x2 * x2;
}
constexpr float Pow4(float x) {
  const float x2 = x * x;
  return x2 * x2;
}

// sum_i a[i] b[i] in double. a, b: [n].
double Dot(absl::Span<const float> a, absl::Span<const float> b);

// y = W x. w: [out, in] row-major (PyTorch's Linear layout), x: [in], y: [out] with
// out = w.size() / x.size(). y must not alias x.
void MatVec(absl::Span<const float> w, absl::Span<const float> x, float* y);

// RoPE of one head vector at position t (algorithm.md section 1): pairs taken interleaved,
// written de-interleaved, theta_i = 10000^(-2i/h), angles t * theta_i in double:
//   y[i] = x[2i] cos - x[2i+1] sin,  y[h/2 + i] = x[2i+1] cos + x[2i] sin,  i < h/2.
// x: [h] (h even), y: [h]; y must not alias x.
void Rope(absl::Span<const float> x, int64_t t, float* y);

// Absolute sinusoidal encoding of position t, in double (algorithm.md section 1):
//   pe[2i] = sin(t * 10000^(-i/(D/2))), pe[2i+1] = cos(same), i < D/2. pe: [D], D even.
void Sinusoidal(int64_t t, int64_t D, double* pe);

// Softmax in place over x: [n]. Entries of -inf get weight 0; at least one entry must be finite
// (a causal query always sees itself). Computed in double, stored rounded to fp32.
void Softmax(absl::Span<float> x);

// Random sketch feature map (algorithm.md section 2): x^ = LayerNorm(x; norm_weight, norm_bias,
// eps), psi = (x^ S1) * (x^ S2) elementwise. x, norm_weight, norm_bias: [h]; s1, s2: [h, r]
// (x is a row vector); psi: [r] with r = s1.size() / h.
void RandomSketchPsi(absl::Span<const float> x, absl::Span<const float> norm_weight,
                     absl::Span<const float> norm_bias, double eps, absl::Span<const float> s1,
                     absl::Span<const float> s2, float* psi);

// One level of a learned sketch branch: LN -> Linear(in, 8r) -> GELU(tanh) -> Linear(8r, r),
// no biases in the linears.
struct LearnedSketchLevel {
  absl::Span<const float> norm_weight;  // [in]
  absl::Span<const float> norm_bias;    // [in]
  absl::Span<const float> up;           // [8r, in]
  absl::Span<const float> down;         // [r, 8r]
};
// The learned sketch of one layer: two branches f1, f2 of two levels each (h -> r, r -> r).
struct LearnedSketchWeights {
  LearnedSketchLevel f1[2];
  LearnedSketchLevel f2[2];
};

// Learned sketch feature map (algorithm.md section 2), applied to x (q or k: post-RoPE, or
// unrotated for "local_rope" models) directly:
// psi = sqrt(r) tanh(f1(x) f2(x) / sqrt(r)) elementwise. x: [h]; psi: [r], r the sketch size of
// `weights` (rows of f1[1].down).
void LearnedSketchPsi(absl::Span<const float> x, const LearnedSketchWeights& weights, double eps,
                      float* psi);

// Recurrent update of one head's packed symmetric sketch state (algorithm.md section 4):
//   S[p(a,c), :] += psi_a psi_c [v; 1]  for 0 <= a <= c < r,  p = PackedSymmetricIndex.
// psi: [r]; v: [h]; s: [P, h+1] fp32, updated in place (each element gets one double-computed
// increment, rounded once).
void SketchUpdate(absl::Span<const float> psi, absl::Span<const float> v, absl::Span<float> s);

// Readout of one head's packed symmetric sketch state (algorithm.md section 4):
//   u = sum_a psi_a^2 S[p(a,a), :] + 2 sum_{a<c} psi_a psi_c S[p(a,c), :].
// psi: [r]; s: [P, h+1] with h + 1 = u.size(); u: [h+1], accumulated in double.
void SketchReadout(absl::Span<const float> psi, absl::Span<const float> s, absl::Span<double> u);

}  // namespace ps::kernels::reference

#endif  // POLYSKETCH_KERNELS_REFERENCE_OPS_H_
