// Picks a kernels::Backend by name, for the --device flag of the server and the tools:
//   "cpu"  the CPU backend with `threads` kernel threads (0: one per hardware thread);
//   "cuda" the CUDA backend on device 0 (FailedPrecondition when the build has no CUDA support
//          or no GPU is visible; the message says which);
//   "auto" CUDA when the build has it and a GPU is visible, else CPU.
// Anything else is InvalidArgument naming the value.
#ifndef POLYSKETCH_KERNELS_BACKEND_FACTORY_H_
#define POLYSKETCH_KERNELS_BACKEND_FACTORY_H_

#include <memory>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "kernels/backend.h"

namespace ps::kernels {

[[nodiscard]] absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(absl::string_view device,
                                                                     int threads);

// True when this binary was built with the CUDA backend (PS_HAVE_CUDA).
bool BuiltWithCuda();

// CUDA devices visible to this process (0 without CUDA support, a driver or a GPU).
int VisibleCudaDevices();

}  // namespace ps::kernels

#endif  // POLYSKETCH_KERNELS_BACKEND_FACTORY_H_
