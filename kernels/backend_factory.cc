// CreateBackend: the only place that knows which backends a build has (PS_HAVE_CUDA is defined for
// this file alone when CMake found a CUDA toolkit).
#include "kernels/backend_factory.h"

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

#include "kernels/cpu/cpu_backend.h"

#if defined(PS_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif

namespace ps::kernels {

bool BuiltWithCuda() {
#if defined(PS_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

int VisibleCudaDevices() {
#if defined(PS_HAVE_CUDA)
  return cuda::CudaDeviceCount();
#else
  return 0;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(absl::string_view device, int threads) {
  if (threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("threads: must be >= 0, got ", threads));
  }
  if (device != "auto" && device != "cpu" && device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("'", device, "' is not one of auto, cpu, cuda"));
  }
  if (device == "cuda" || (device == "auto" && VisibleCudaDevices() > 0)) {
#if defined(PS_HAVE_CUDA)
    if (VisibleCudaDevices() == 0) {
      return absl::FailedPreconditionError(
          "cuda: no CUDA device is visible to this process (no GPU, no driver, or "
          "CUDA_VISIBLE_DEVICES hides it); use --device=cpu or auto");
    }
    absl::StatusOr<std::unique_ptr<cuda::CudaBackend>> backend = cuda::CudaBackend::Create();
    if (!backend.ok()) return backend.status();
    return std::unique_ptr<Backend>(std::move(*backend));
#else
    return absl::FailedPreconditionError(
        "cuda: this binary was built without CUDA support (no CUDA toolkit was found at "
        "configure time); use --device=cpu or auto");
#endif
  }
  return std::unique_ptr<Backend>(std::make_unique<cpu::CpuBackend>(threads));
}

}  // namespace ps::kernels
