// --kv_cache_dtype's values: the two dtypes, `auto` per backend, and every other spelling refused
// with the flag's name.
#include "server/engine/model/kv_cache_dtype.h"

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::kernels::KvCacheDtype;
using ::ps::test::StatusIs;

TEST(KvCacheDtypeTest, ResolvesTheValues) {
  for (const char* backend : {"cpu", "cuda"}) {
    PS_ASSERT_OK_AND_ASSIGN(KvCacheDtype fp32, ResolveKvCacheDtype("fp32", backend));
    EXPECT_EQ(fp32, KvCacheDtype::kFp32) << backend;
    PS_ASSERT_OK_AND_ASSIGN(KvCacheDtype fp16, ResolveKvCacheDtype("fp16", backend));
    EXPECT_EQ(fp16, KvCacheDtype::kFp16) << backend;
  }
  PS_ASSERT_OK_AND_ASSIGN(KvCacheDtype cpu, ResolveKvCacheDtype("auto", "cpu"));
  EXPECT_EQ(cpu, KvCacheDtype::kFp16);
  PS_ASSERT_OK_AND_ASSIGN(KvCacheDtype cuda, ResolveKvCacheDtype("auto", "cuda"));
  EXPECT_EQ(cuda, KvCacheDtype::kFp32);
  EXPECT_EQ(KvCacheDtypeName(KvCacheDtype::kFp16), "fp16");
  EXPECT_EQ(KvCacheDtypeName(KvCacheDtype::kFp32), "fp32");
}

TEST(KvCacheDtypeTest, RefusesOtherSpellings) {
  for (const char* value : {"", "FP16", "f16", "float16", "bf16", "fp8", "fp16 ", "auto,fp16"}) {
    EXPECT_THAT(ResolveKvCacheDtype(value, "cpu"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         absl::StrCat("--kv_cache_dtype: expected auto, fp32 or fp16, got \"",
                                      value, "\"")))
        << value;
  }
}

}  // namespace
}  // namespace ps::engine
