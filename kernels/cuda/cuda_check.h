// Status-returning checks for CUDA runtime and cuBLAS calls (docs/architecture.md, "Errors": a
// CUDA failure is Internal with the CUDA error; nothing aborts on a failed call).
#ifndef POLYSKETCH_KERNELS_CUDA_CUDA_CHECK_H_
#define POLYSKETCH_KERNELS_CUDA_CUDA_CHECK_H_

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <cuda_runtime_api.h>

namespace ps::kernels::cuda {

inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

}  // namespace ps::kernels::cuda

// PS_CUDA_RETURN_IF_ERROR(cudaMalloc(...)): returns Internal naming the call and the CUDA error.
#define PS_CUDA_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                     \
    const ::absl::Status ps_cuda_status_ = ::ps::kernels::cuda::CudaStatus((expr), #expr); \
    if (!ps_cuda_status_.ok()) return ps_cuda_status_;                                     \
  } while (0)

#endif  // POLYSKETCH_KERNELS_CUDA_CUDA_CHECK_H_
