// --weights_dtype: parsing, "auto", and the backend's refusal, each with a message that names the
// flag (weights_dtype.h).
#include "server/engine/model/weights_dtype.h"

#include <string>

#include <absl/status/status.h>
#include <absl/strings/escaping.h>
#include <absl/strings/str_cat.h>

namespace ps::engine {
namespace {

// True when the model's linear weights are stored in bf16: its config says so, or every matrix
// in the file is BF16 (the safetensors header is authoritative; docs/model-format.md).
bool StoredInBf16(const ModelWeights& weights) {
  if (weights.config.torch_dtype == "bf16") return true;
  bool any_matrix = false;
  for (const auto& [name, tensor] : weights.tensors) {
    if (tensor.shape.size() != 2) continue;
    if (tensor.stored_dtype != DType::kBF16) return false;
    any_matrix = true;
  }
  return any_matrix;
}

}  // namespace

absl::Status CheckWeightsDtypeFlag(absl::string_view value) {
  for (absl::string_view allowed : {"auto", "fp32", "bf16", "int8"}) {
    if (value == allowed) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("--weights_dtype: must be one of ",
                                                 kWeightsDtypeValues, ", got \"",
                                                 absl::CHexEscape(value), "\""));
}

absl::StatusOr<kernels::WeightDtype> ResolveWeightsDtype(absl::string_view value,
                                                         const ModelWeights& weights,
                                                         const kernels::Backend& backend) {
  if (absl::Status status = CheckWeightsDtypeFlag(value); !status.ok()) return status;
  kernels::WeightDtype dtype = kernels::WeightDtype::kFp32;
  if (value == "auto") {
    const bool bf16 = StoredInBf16(weights) && backend.name() == "cpu";
    if (bf16) dtype = kernels::WeightDtype::kBf16;
  } else if (value == "bf16") {
    dtype = kernels::WeightDtype::kBf16;
  } else if (value == "int8") {
    dtype = kernels::WeightDtype::kInt8;
  }
  if (absl::Status status = backend.CheckWeightDtype(dtype); !status.ok()) {
    return absl::Status(
        status.code(),
        absl::StrCat("--weights_dtype ", value, ": ", status.message(),
                     "; use --weights_dtype auto or fp32 on the ", backend.name(), " backend"));
  }
  return dtype;
}

}  // namespace ps::engine
