#include "server/engine/model/kv_cache_dtype.h"

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

namespace ps::engine {

absl::string_view KvCacheDtypeName(kernels::KvCacheDtype dtype) {
  return dtype == kernels::KvCacheDtype::kFp16 ? "fp16" : "fp32";
}

absl::StatusOr<kernels::KvCacheDtype> ResolveKvCacheDtype(absl::string_view value,
                                                          absl::string_view backend) {
  if (value == "fp32") return kernels::KvCacheDtype::kFp32;
  if (value == "fp16") return kernels::KvCacheDtype::kFp16;
  if (value == "auto") {
    return backend == "cpu" ? kernels::KvCacheDtype::kFp16 : kernels::KvCacheDtype::kFp32;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--kv_cache_dtype: expected auto, fp32 or fp16, got \"", value, "\""));
}

}  // namespace ps::engine
