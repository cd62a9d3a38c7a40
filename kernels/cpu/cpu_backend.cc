#include "kernels/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

#include "kernels/cpu/dense.h"
#include "kernels/cpu/kv_attention.h"
#include "kernels/cpu/sketch_attention.h"

namespace ps::kernels::cpu {
namespace {

constexpr int64_t kAlignment = 64;

const CpuLinearWeight& AsCpu(const LinearWeight& w) {
  // Every LinearWeight this backend sees came from its own PrepareLinear.
  return static_cast<const CpuLinearWeight&>(w);
}

}  // namespace

CpuBackend::CpuBackend(int num_threads) : pool_(num_threads), lowp_isa_(BestLowpIsa()) {}

absl::StatusOr<DeviceBuffer> CpuBackend::Allocate(int64_t bytes) {
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat("Allocate: bytes ", bytes, " < 0"));
  if (bytes == 0) return DeviceBuffer();
  const int64_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* data = std::aligned_alloc(kAlignment, static_cast<size_t>(rounded));
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
  }
  std::memset(data, 0, static_cast<size_t>(rounded));
  return DeviceBuffer(this, data, bytes);
}

void CpuBackend::Free(void* data, int64_t /*bytes*/) { std::free(data); }

void CpuBackend::CopyFromHost(const void* host, int64_t bytes, void* device) {
  if (bytes > 0) std::memcpy(device, host, static_cast<size_t>(bytes));
}

void CpuBackend::CopyToHost(const void* device, int64_t bytes, void* host) {
  if (bytes > 0) std::memcpy(host, device, static_cast<size_t>(bytes));
}

void CpuBackend::Zero(void* device, int64_t bytes) {
  if (bytes > 0) std::memset(device, 0, static_cast<size_t>(bytes));
}

void CpuBackend::Copy(const void* src, int64_t bytes, void* dst) {
  if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
}

absl::StatusOr<std::unique_ptr<LinearWeight>> CpuBackend::PrepareLinear(absl::Span<const float> w,
                                                                        int64_t n, int64_t k,
                                                                        WeightDtype dtype) {
  if (n <= 0 || k <= 0 || static_cast<int64_t>(w.size()) != n * k) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrepareLinear: weight of ", w.size(), " floats is not [", n, ", ", k, "]"));
  }
  if (dtype != WeightDtype::kFp32) {
    absl::StatusOr<std::unique_ptr<CpuLowpLinearWeight>> lowp =
        CpuLowpLinearWeight::Create(w, n, k, dtype);
    if (!lowp.ok()) return lowp.status();
    return std::unique_ptr<LinearWeight>(*std::move(lowp));
  }
  try {
    return std::unique_ptr<LinearWeight>(CpuLinearWeight::Create(w, n, k));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate a [", n, ", ", k, "] weight"));
  }
}

void CpuBackend::Linear(const float* x, int64_t m, const LinearWeight& w, float* y,
                        bool accumulate) {
  if (w.dtype() != WeightDtype::kFp32) {
    // Every non-fp32 LinearWeight of this backend is a CpuLowpLinearWeight (PrepareLinear).
    LinearLowp(pool_, x, m, static_cast<const CpuLowpLinearWeight&>(w), y, accumulate, lowp_isa_);
    return;
  }
  cpu::Linear(pool_, x, m, AsCpu(w), y, accumulate);
}

void CpuBackend::LayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma,
                           const float* beta, float eps, float* y) {
  cpu::LayerNorm(pool_, x, rows, n, gamma, beta, eps, y);
}

void CpuBackend::Embed(const float* table, int64_t d, absl::Span<const int32_t> tokens,
                       absl::Span<const int64_t> positions, bool sinusoidal, float* x) {
  cpu::Embed(pool_, table, d, tokens, positions, sinusoidal, x);
}

void CpuBackend::SplitQkvRope(const float* qkv, int64_t heads, int64_t head_dim,
                              absl::Span<const int64_t> positions, bool rope, float* q, float* k,
                              float* v) {
  cpu::SplitQkvRope(pool_, qkv, heads, head_dim, positions, rope, q, k, v);
}

void CpuBackend::Rope(const float* x, int64_t heads, int64_t head_dim,
                      absl::Span<const int64_t> positions, float* y) {
  cpu::Rope(pool_, x, heads, head_dim, positions, y);
}

void CpuBackend::GeluGate(const float* up, int64_t m, int64_t f, float* out) {
  cpu::GeluGate(pool_, up, m, f, out);
}

void CpuBackend::Gelu(float* x, int64_t n) { cpu::Gelu(pool_, x, n); }

void CpuBackend::Multiply(const float* a, const float* b, int64_t n, float* out) {
  cpu::Multiply(pool_, a, b, n, out);
}

void CpuBackend::SketchCombine(const float* f1, const float* f2, int64_t rows, int64_t r,
                               float* psi) {
  cpu::SketchCombine(pool_, f1, f2, rows, r, psi);
}

void CpuBackend::AddBias(float* y, int64_t m, int64_t n, const float* bias) {
  cpu::AddBias(pool_, y, m, n, bias);
}

void CpuBackend::SketchDecode(const SketchAttentionShape& shape,
                              absl::Span<const int64_t> positions,
                              absl::Span<const SketchSlotState> slots, const float* psi_q,
                              const float* psi_k, const float* v, const float* q_local,
                              const float* k_local, float* out) {
  cpu::SketchDecode(pool_, shape, positions, slots, psi_q, psi_k, v, q_local, k_local, out);
}

void CpuBackend::SketchPrefill(const SketchAttentionShape& shape, int64_t start, int64_t n,
                               const SketchSlotState& slot, const float* psi_q, const float* psi_k,
                               const float* v, const float* q_local, const float* k_local,
                               float* out) {
  cpu::SketchPrefill(pool_, shape, start, n, slot, psi_q, psi_k, v, q_local, k_local, out);
}

void CpuBackend::KvDecode(const KvAttentionShape& shape, absl::Span<const int64_t> positions,
                          absl::Span<const KvSlotState> slots, const float* q, const float* k,
                          const float* v, float* out) {
  cpu::KvDecode(pool_, shape, positions, slots, q, k, v, out);
}

void CpuBackend::KvPrefill(const KvAttentionShape& shape, int64_t start, int64_t n,
                           const KvSlotState& slot, const float* q, const float* k, const float* v,
                           float* out) {
  cpu::KvPrefill(pool_, shape, start, n, slot, q, k, v, out);
}

}  // namespace ps::kernels::cpu
