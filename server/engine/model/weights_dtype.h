// The --weights_dtype flag of the server and the tools (issue 19; docs/model-format.md,
// "weights_dtype"): which precision the linear layers' weights are kept in, chosen at load.
//   auto  the model's stored format: bf16 when its linear weights are stored in bf16 (config.json
//         torch_dtype "bf16", or every matrix stored BF16 in model.safetensors) and the backend
//         is the CPU one; fp32 otherwise. Never int8: quantisation is asked for explicitly, as
//         vLLM's --dtype auto does; fp32 keeps the golden fixtures' 1e-4 parity.
//   fp32, bf16, int8  that format (kernels/backend.h WeightDtype).
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_WEIGHTS_DTYPE_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_WEIGHTS_DTYPE_H_

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "kernels/backend.h"
#include "server/engine/model_io/weights.h"

namespace ps::engine {

// The --weights_dtype values, for usage strings: "auto, fp32, bf16, int8".
inline constexpr char kWeightsDtypeValues[] = "auto, fp32, bf16, int8";

// OK when `value` is one of kWeightsDtypeValues; else InvalidArgument naming --weights_dtype, the
// value and the allowed ones. For checking the flag before the model loads.
[[nodiscard]] absl::Status CheckWeightsDtypeFlag(absl::string_view value);

// `value` (the flag's text) for `weights` on `backend`. InvalidArgument naming --weights_dtype,
// the value and the allowed ones for anything else; Unimplemented naming --weights_dtype and the
// backend when the backend has no such weights (Backend::CheckWeightDtype: the CUDA backend
// refuses bf16 and int8).
[[nodiscard]] absl::StatusOr<kernels::WeightDtype> ResolveWeightsDtype(
    absl::string_view value, const ModelWeights& weights, const kernels::Backend& backend);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_WEIGHTS_DTYPE_H_
