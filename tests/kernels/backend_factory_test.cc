// CreateBackend: names, the CPU backend, and a clean refusal of "cuda" where this build or this
// machine cannot provide it (or a CUDA backend where it can).
#include "kernels/backend_factory.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps::kernels {
namespace {

using ::ps::test::StatusIs;

TEST(BackendFactoryTest, CpuIsAlwaysAvailable) {
  auto backend = CreateBackend("cpu", 2);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->name(), "cpu");
  EXPECT_TRUE((*backend)->host_memory());
}

TEST(BackendFactoryTest, RefusesUnknownNamesAndNegativeThreads) {
  EXPECT_THAT(CreateBackend("gpu", 0).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "'gpu'"));
  EXPECT_THAT(CreateBackend("", 0).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CreateBackend("cpu", -1).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "threads"));
}

TEST(BackendFactoryTest, CudaIsRefusedCleanlyWithoutSupportOrDevice) {
  auto backend = CreateBackend("cuda", 0);
  if (BuiltWithCuda() && VisibleCudaDevices() > 0) {
    ASSERT_TRUE(backend.ok()) << backend.status();
    EXPECT_EQ((*backend)->name(), "cuda");
    EXPECT_FALSE((*backend)->host_memory());
    return;
  }
  EXPECT_THAT(backend.status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       BuiltWithCuda() ? "no CUDA device" : "without CUDA support"));
}

TEST(BackendFactoryTest, AutoPicksCudaOnlyWhenAGpuIsThere) {
  auto backend = CreateBackend("auto", 1);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->name(), BuiltWithCuda() && VisibleCudaDevices() > 0 ? "cuda" : "cpu");
}

}  // namespace
}  // namespace ps::kernels
