// The CPU backend: kernels/backend.h on host memory, every op threaded over one ThreadPool and
// vectorised (kernels/cpu/dense.h, sketch_attention.h, kv_attention.h). Device memory is host
// memory here, so buffers from other host allocators (the engine's state pool) are valid too.
#ifndef POLYSKETCH_KERNELS_CPU_CPU_BACKEND_H_
#define POLYSKETCH_KERNELS_CPU_CPU_BACKEND_H_

#include <cstdint>
#include <memory>

#include "kernels/backend.h"
#include "kernels/cpu/lowp_linear.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {

class CpuBackend final : public Backend {
 public:
  // `num_threads` threads for the kernels, counting the caller; 0: one per hardware thread.
  explicit CpuBackend(int num_threads = 0);

  absl::string_view name() const override { return "cpu"; }
  bool host_memory() const override { return true; }
  int num_threads() const { return pool_.num_threads(); }
  ThreadPool& pool() { return pool_; }

  absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes) override;
  void CopyFromHost(const void* host, int64_t bytes, void* device) override;
  void CopyToHost(const void* device, int64_t bytes, void* host) override;
  void Zero(void* device, int64_t bytes) override;
  void Copy(const void* src, int64_t bytes, void* dst) override;
  // fp32, bf16 and int8 weights (kernels/cpu/lowp_linear.h for the last two).
  absl::Status CheckWeightDtype(WeightDtype /*dtype*/) const override { return absl::OkStatus(); }
  absl::StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(absl::Span<const float> w, int64_t n,
                                                              int64_t k,
                                                              WeightDtype dtype) override;
  // The kernel path of bf16 and int8 Linear: the best this CPU has (lowp_linear.h).
  LowpIsa lowp_isa() const { return lowp_isa_; }

  void Linear(const float* x, int64_t m, const LinearWeight& w, float* y, bool accumulate) override;
  void LayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma, const float* beta,
                 float eps, float* y) override;
  void Embed(const float* table, int64_t d, absl::Span<const int32_t> tokens,
             absl::Span<const int64_t> positions, bool sinusoidal, float* x) override;
  void SplitQkvRope(const float* qkv, int64_t heads, int64_t head_dim,
                    absl::Span<const int64_t> positions, bool rope, float* q, float* k,
                    float* v) override;
  void Rope(const float* x, int64_t heads, int64_t head_dim, absl::Span<const int64_t> positions,
            float* y) override;
  void GeluGate(const float* up, int64_t m, int64_t f, float* out) override;
  void Gelu(float* x, int64_t n) override;
  void Multiply(const float* a, const float* b, int64_t n, float* out) override;
  void SketchCombine(const float* f1, const float* f2, int64_t rows, int64_t r,
                     float* psi) override;
  void AddBias(float* y, int64_t m, int64_t n, const float* bias) override;

  void SketchDecode(const SketchAttentionShape& shape, absl::Span<const int64_t> positions,
                    absl::Span<const SketchSlotState> slots, const float* psi_q, const float* psi_k,
                    const float* v, const float* q_local, const float* k_local,
                    float* out) override;
  void SketchPrefill(const SketchAttentionShape& shape, int64_t start, int64_t n,
                     const SketchSlotState& slot, const float* psi_q, const float* psi_k,
                     const float* v, const float* q_local, const float* k_local,
                     float* out) override;
  void KvDecode(const KvAttentionShape& shape, absl::Span<const int64_t> positions,
                absl::Span<const KvSlotState> slots, const float* q, const float* k, const float* v,
                float* out) override;
  void KvPrefill(const KvAttentionShape& shape, int64_t start, int64_t n, const KvSlotState& slot,
                 const float* q, const float* k, const float* v, float* out) override;

 protected:
  void Free(void* data, int64_t bytes) override;

 private:
  ThreadPool pool_;
  LowpIsa lowp_isa_;
};

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_CPU_BACKEND_H_
