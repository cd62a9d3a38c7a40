// --kv_cache_dtype (polysketch-server, polysketch-generate; vLLM's flag name): how the KV caches
// of softmax, polynomial, sliding_window and sparse layers store keys and values. One place turns
// the flag's text into kernels::KvCacheDtype so that both programs accept and refuse the same
// values and resolve `auto` the same way.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_KV_CACHE_DTYPE_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_KV_CACHE_DTYPE_H_

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "kernels/backend.h"

namespace ps::engine {

// "fp32" or "fp16".
absl::string_view KvCacheDtypeName(kernels::KvCacheDtype dtype);

// The dtype the flag value asks for on a backend named `backend` (Backend::name(): "cpu",
// "cuda"). "fp32", "fp16": that dtype (a backend that cannot keep it refuses it later, at
// Model::Create, naming the flag). "auto": fp16 on the cpu backend, where it halves the cache's
// memory and the bytes a decode step streams (GPT-2-small shape at 16k: 1.8x faster decode; at
// 1k-4k within the noise of the shared machine; docs/performance.md, issue 19, KV cache) and
// matches what llama.cpp runs by default; fp32 elsewhere (the cuda backend keeps fp32 caches
// only). InvalidArgument naming the flag and the value for anything else.
[[nodiscard]] absl::StatusOr<kernels::KvCacheDtype> ResolveKvCacheDtype(absl::string_view value,
                                                                        absl::string_view backend);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_KV_CACHE_DTYPE_H_
