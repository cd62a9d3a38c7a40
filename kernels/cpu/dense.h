// The CPU backend's dense ops (kernels/backend.h, "dense ops"): the linear layers (a packed fp32
// GEMM), LayerNorm, embedding + sinusoidal encoding, QKV split + RoPE, GELU and the small
// elementwise ops. Free functions taking the shared ThreadPool first; CpuBackend forwards to them.
// Semantics are exactly those documented on the Backend methods; numerics follow
// kernels/reference/ops.h (the oracle these are tested against in tests/kernels/cpu/dense_test.cc).
//
// Shape letters (algorithm.md): m rows of a call, n x k a weight W [n, k] (PyTorch [out, in]),
// D width, H heads, h head width, F FFN width, r sketch size.
//
// Thread-safety: engine thread only (one call at a time per pool); each op parallelises over the
// pool internally. Pointers are host memory owned by the caller. Linear allocates nothing;
// Embed, SplitQkvRope and Rope allocate small per-call angle tables (d/2 and h/2 doubles).
#ifndef POLYSKETCH_KERNELS_CPU_DENSE_H_
#define POLYSKETCH_KERNELS_CPU_DENSE_H_

#include <cstdint>
#include <memory>

#include <absl/types/span.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {

// A linear layer's weight W [n, k] repacked for the GEMM micro-kernel: W^T cut into column
// panels of kPanelWidth output features, panel p holding W[p*NR + j, kk] at
// panel(p)[kk * NR + j] (k rows of NR contiguous floats, the last panel zero-padded). 64-byte
// aligned, fp32, immutable after Create.
class CpuLinearWeight final : public ps::kernels::LinearWeight {
 public:
  // NR: two SIMD vectors of the compiled instruction set (32 with AVX-512, 16 with AVX2/AVX,
  // 8 with SSE only).
  static const int64_t kPanelWidth;

  // w: [n, k] row-major fp32 (host), n, k >= 1 (caller's invariant; asserted).
  static std::unique_ptr<CpuLinearWeight> Create(absl::Span<const float> w, int64_t n, int64_t k);

  int64_t num_panels() const { return num_panels_; }
  // Panel p: [k, kPanelWidth].
  const float* panel(int64_t p) const { return data_.get() + p * in_features() * kPanelWidth; }

 private:
  struct FreeDeleter {
    void operator()(float* p) const;
  };
  CpuLinearWeight(int64_t n, int64_t k);

  int64_t num_panels_ = 0;
  std::unique_ptr<float, FreeDeleter> data_;  // [num_panels, k, kPanelWidth]
};

// y[m, n] = x[m, k] W^T, or y += x W^T when `accumulate`. x: [m, k], y: [m, n]; y must not alias
// x. fp32 with fp32 (FMA) accumulation in k order. m >= 0 (m == 0 does nothing).
void Linear(ThreadPool& pool, const float* x, int64_t m, const CpuLinearWeight& w, float* y,
            bool accumulate);

// Row-wise LayerNorm with biased variance (PyTorch): x, y [rows, n]; gamma, beta [n]. Mean and
// variance accumulate in double (two passes). y may alias x.
void LayerNorm(ThreadPool& pool, const float* x, int64_t rows, int64_t n, const float* gamma,
               const float* beta, float eps, float* y);

// x[i, :] = table[tokens[i], :] + pe(positions[i]), pe the sinusoidal encoding of algorithm.md
// section 1 with angles, sin and cos in double, the sum rounded to fp32 once; without
// `sinusoidal`, a copy of the table rows. table [V, d]; x [m, d],
// m = tokens.size() == positions.size(); d even.
void Embed(ThreadPool& pool, const float* table, int64_t d, absl::Span<const int32_t> tokens,
           absl::Span<const int64_t> positions, bool sinusoidal, float* x);

// Splits qkv [m, 3D] = [q | k | v] (D = heads * head_dim) into q, k, v [m, H, h]; with `rope`,
// applying RoPE (algorithm.md section 1, reference::Rope: angles in double) to q and k at
// positions[i], else copying them unrotated. m = positions.size(); head_dim even. Outputs must
// not alias qkv.
void SplitQkvRope(ThreadPool& pool, const float* qkv, int64_t heads, int64_t head_dim,
                  absl::Span<const int64_t> positions, bool rope, float* q, float* k, float* v);

// y = RoPE(x) of every head of row i at positions[i], the rotation of SplitQkvRope. x, y
// [m, H, h], m = positions.size(); head_dim even; y must not alias x.
void Rope(ThreadPool& pool, const float* x, int64_t heads, int64_t head_dim,
          absl::Span<const int64_t> positions, float* y);

// out[i, j] = up[i, j] * gelu_tanh(up[i, F + j]); up [m, 2F], out [m, F]. gelu_tanh in fp32 as
// x * sigmoid(2 u), u = sqrt(2/pi) (x + 0.044715 x^3) (the same function as reference::GeluTanh,
// without the cancellation of 1 + tanh for negative x), a few ulp from the double reference.
void GeluGate(ThreadPool& pool, const float* up, int64_t m, int64_t f, float* out);

// x = gelu_tanh(x) in place, n elements (same numerics as GeluGate).
void Gelu(ThreadPool& pool, float* x, int64_t n);

// out = a * b elementwise, n elements; out may alias a or b.
void Multiply(ThreadPool& pool, const float* a, const float* b, int64_t n, float* out);

// psi = sqrt(r) tanh(f1 * f2 / sqrt(r)) elementwise (algorithm.md section 2, learned sketch),
// computed in double and rounded once. f1, f2, psi [rows, r]; psi may alias f1 or f2.
void SketchCombine(ThreadPool& pool, const float* f1, const float* f2, int64_t rows, int64_t r,
                   float* psi);

// y[i, :] += bias for every row; y [m, n], bias [n].
void AddBias(ThreadPool& pool, float* y, int64_t m, int64_t n, const float* bias);

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_DENSE_H_
