// The CUDA backend: kernels/backend.h on device memory of one GPU, every op enqueued on one CUDA
// stream (so ops are ordered; CopyToHost synchronises, which is how the engine observes results).
// Linear layers run on cuBLAS with weights converted once to bf16 at PrepareLinear; the other ops
// are the fused kernels of dense_kernels.cu, sketch_kernels.cu and kv_kernels.cu.
//
// GEMM precision (documented choice): activations stay fp32 in the model; Linear converts x to
// bf16 in a small kernel (one extra read of x and write of half its bytes) and calls
// cublasGemmEx with bf16 A and B, fp32 C and CUBLAS_COMPUTE_32F (fp32 accumulation). The
// alternative, a mixed fp32 x bf16 GEMM, has no cuBLAS kernel. GemmPrecision::kFp32 keeps fp32
// weights and uses cublasSgemm instead: slower, for parity tests and debugging.
//
// Errors: backend ops return nothing (kernels/backend.h); a failed CUDA or cuBLAS call is recorded
// and reported by TakeStatus (which the model calls once per forward pass), status() and
// Synchronize(). Such a failure is sticky (failed() turns true, the first one is kept and printed
// once to stderr): a CUDA error may poison the context, and the device memory the failed work
// wrote, every request's state slot included, holds unknown values. Two failures, where nothing
// ran, are passing (reported once by TakeStatus): a scratch buffer that cannot grow
// (ResourceExhausted) and a KV op called with a head width its kernels do not support
// (Unimplemented; CheckShape refuses such models at load, head_dim above kMaxKvHeadDim).
// Allocation failures are returned as ResourceExhausted.
//
// Thread-compatibility: engine thread only, like every backend. The current CUDA device is set to
// this backend's device on creation; callers that use several devices must keep it set.
#ifndef POLYSKETCH_KERNELS_CUDA_CUDA_BACKEND_H_
#define POLYSKETCH_KERNELS_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include "kernels/backend.h"

namespace ps::kernels::cuda {

enum class GemmPrecision {
  kBf16,  // bf16 operands, fp32 accumulation and output (the default)
  kFp32,  // fp32 operands (cublasSgemm): parity tests
};

struct CudaBackendOptions {
  int device = 0;
  GemmPrecision gemm = GemmPrecision::kBf16;
};

// Number of CUDA devices usable by this process; 0 when there is none or no driver (never an
// error: "no GPU" is a normal answer on CPU machines).
int CudaDeviceCount();

class CudaBackend final : public Backend {
 public:
  // FailedPrecondition when there is no such device; Internal for CUDA / cuBLAS failures.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(
      const CudaBackendOptions& options = {});
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  absl::string_view name() const override { return "cuda"; }
  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
  const std::string& device_description() const { return description_; }
  int num_sms() const { return num_sms_; }
  // Waits for all enqueued work; the first recorded error, if any.
  [[nodiscard]] absl::Status Synchronize();
  // The first CUDA / cuBLAS error any op met (OK if none): the sticky failure.
  absl::Status status() const { return status_; }
  // Waits for the stream; then the sticky failure, else the passing one since the last call.
  absl::Status TakeStatus() override;
  bool failed() const override { return !status_.ok(); }
  // Unimplemented for head_dim > kMaxKvHeadDim (256).
  absl::Status CheckShape(const KvAttentionShape& shape) const override;

  absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes) override;
  void CopyFromHost(const void* host, int64_t bytes, void* device) override;
  void CopyToHost(const void* device, int64_t bytes, void* host) override;
  void Zero(void* device, int64_t bytes) override;
  void Copy(const void* src, int64_t bytes, void* dst) override;
  // Only kFp32: the weights then run as the GemmPrecision above says (bf16 operands by default);
  // bf16 and int8 weight formats are the CPU backend's (issue 19).
  absl::Status CheckWeightDtype(WeightDtype dtype) const override;
  absl::StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(absl::Span<const float> w, int64_t n,
                                                              int64_t k,
                                                              WeightDtype dtype) override;

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
  struct Impl;
  explicit CudaBackend(std::unique_ptr<Impl> impl);

  // Records a failure: the first sticky one is kept (and printed once), later ones are dropped;
  // a passing one (sticky false) is kept until TakeStatus reports it.
  void Record(absl::Status status, bool sticky = true);
  void CheckLaunch(const char* what);
  // Copies `bytes` of host memory to device memory valid until the next synchronisation point,
  // through the pinned staging arena (kernel arguments too large to pass by value).
  const void* Upload(const void* host, int64_t bytes);
  // Makes room for `bytes` of uploads (plus the positions) before a call's first Upload, so that
  // no later Upload of the same call wraps the arena over an earlier one.
  void ReserveUploads(int64_t bytes);
  const int64_t* UploadPositions(absl::Span<const int64_t> positions);
  // A device scratch buffer of at least `bytes` (grown on demand, kept).
  void* Scratch(DeviceBuffer& buffer, int64_t bytes);

  std::unique_ptr<Impl> impl_;
  std::string description_;
  int num_sms_ = 0;
  absl::Status status_;     // sticky
  absl::Status transient_;  // passing, until TakeStatus
  DeviceBuffer bf16_x_;     // Linear: x converted to bf16
  DeviceBuffer partials_;   // decode split partials
};

}  // namespace ps::kernels::cuda

#endif  // POLYSKETCH_KERNELS_CUDA_CUDA_BACKEND_H_
