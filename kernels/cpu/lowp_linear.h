// Linear layers with bf16 or int8 weights on the CPU (issue 19; kernels/backend.h WeightDtype):
// y[m, n] (+)= x[m, k] W^T with W kept in 2 or 1 byte per weight and x, y and the accumulation in
// fp32. At decode the fp32 GEMM streams W once per step and is bound by memory bandwidth, so
// halving or quartering W's bytes is what makes a step faster.
//
// Kernel paths, chosen at run time from what the CPU has (cpuid; the binary runs everywhere, the
// paths are compiled with target attributes, not with the build's -march):
//   kScalar      portable loops, built on every architecture; also the oracle layout reader;
//   kAvx2        AVX2 + FMA: weights widened in registers (bf16: a shift or a mask; int8:
//                sign-extend + convert), fp32 FMA;
//   kAvx512      AVX-512F + BW: the same on 16-float vectors;
//   kAvx512Bf16  AVX-512 BF16 for bf16 weights: vdpbf16ps on weight pairs, with each x element
//                split into two bf16 terms (hi + lo, x to 2^-16 relative) so that activations
//                keep (nearly) fp32 precision; int8 weights run the kAvx512 path.
//
// Shape letters (algorithm.md): m rows of a call, W [n, k] (PyTorch [out, in]).
// Thread-safety: engine thread only (one call at a time per pool). Pointers are host memory owned
// by the caller.
#ifndef POLYSKETCH_KERNELS_CPU_LOWP_LINEAR_H_
#define POLYSKETCH_KERNELS_CPU_LOWP_LINEAR_H_

#include <cstdint>
#include <memory>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {

enum class LowpIsa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };

absl::string_view LowpIsaName(LowpIsa isa);  // "scalar", "avx2", "avx512", "avx512bf16"
// The paths this CPU runs, kScalar first, then in increasing order of capability.
std::vector<LowpIsa> SupportedLowpIsas();
// What the CPU backend uses: kAvx512 where present (measured faster than kAvx512Bf16, whose hi + lo
// split of x doubles the vdpbf16ps count; docs/performance.md), else the last of
// SupportedLowpIsas(). kAvx512Bf16 stays tested and benchmarked for machines where it wins.
LowpIsa BestLowpIsa();

// W [n, k] in bf16 or int8, packed in panels of kPanelWidth = 16 output features (one AVX-512
// vector of fp32, two AVX2 ones), the last panel zero-padded:
//   bf16: panel p is [ceil(k/2), 16, 2] uint16: element (t, j, e) = W[16p + j, 2t + e] (pairs of
//         k interleaved, vdpbf16ps's operand order; k padded to even with 0);
//   int8: panel p is [k, 16] int8: element (i, j) = q[16p + j, i]; scale[16p + j] the row's
//         scale (kernels/weight_quant.h), 0 for padding rows.
// 64-byte aligned; immutable after Create.
class CpuLowpLinearWeight final : public LinearWeight {
 public:
  static constexpr int64_t kPanelWidth = 16;

  // w: [n, k] row-major fp32 (host), dtype kBf16 or kInt8. InvalidArgument when n or k < 1,
  // w.size() != n * k, dtype is kFp32, or (kInt8) a weight is not finite (naming its row and
  // column); ResourceExhausted when the memory cannot be had.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<CpuLowpLinearWeight>> Create(
      absl::Span<const float> w, int64_t n, int64_t k, WeightDtype dtype);

  int64_t num_panels() const { return num_panels_; }
  int64_t num_pairs() const { return (in_features() + 1) / 2; }  // bf16: ceil(k/2)
  // bf16 panel p: [num_pairs(), 16, 2].
  const uint16_t* bf16_panel(int64_t p) const {
    return static_cast<const uint16_t*>(data_.get()) + p * num_pairs() * kPanelWidth * 2;
  }
  // int8 panel p: [k, 16].
  const int8_t* int8_panel(int64_t p) const {
    return static_cast<const int8_t*>(data_.get()) + p * in_features() * kPanelWidth;
  }
  // int8: [num_panels() * 16] per-row scales; empty for bf16.
  const float* scales() const { return scales_.data(); }
  // Bytes of packed weights (plus scales): what one pass over W streams.
  int64_t bytes() const { return bytes_; }

 private:
  struct FreeDeleter {
    void operator()(void* p) const;
  };
  CpuLowpLinearWeight(int64_t n, int64_t k, WeightDtype dtype) : LinearWeight(n, k, dtype) {}

  int64_t num_panels_ = 0;
  int64_t bytes_ = 0;
  std::unique_ptr<void, FreeDeleter> data_;
  std::vector<float> scales_;
};

// y[m, n] = x[m, k] W^T, or y += x W^T when `accumulate`, on kernel path `isa` (which must be in
// SupportedLowpIsas(): the caller's invariant). x: [m, k], y: [m, n]; y must not alias x. m == 0
// does nothing. Numerics: the weights as packed (bf16 exactly; int8 as q with the row scale
// applied once to the finished dot product), fp32 FMA accumulation; kAvx512Bf16 rounds x to
// hi + lo bf16 terms first (relative error <= 2^-16 per element).
void LinearLowp(ThreadPool& pool, const float* x, int64_t m, const CpuLowpLinearWeight& w, float* y,
                bool accumulate, LowpIsa isa);

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_LOWP_LINEAR_H_
