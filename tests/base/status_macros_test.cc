// PS_RETURN_IF_ERROR / PS_ASSIGN_OR_RETURN: early return with the original status, single
// evaluation, move-only values, and several uses in one scope.
#include "base/status_macros.h"

#include <memory>
#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

absl::Status Fail(int* calls) {
  ++*calls;
  return absl::DataLossError("broken");
}

absl::Status Succeed(int* calls) {
  ++*calls;
  return absl::OkStatus();
}

absl::Status ReturnIfError(bool fail, int* calls, bool* reached_end) {
  PS_RETURN_IF_ERROR(Succeed(calls));
  PS_RETURN_IF_ERROR(fail ? Fail(calls) : Succeed(calls));
  *reached_end = true;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, ReturnIfErrorPassesOk) {
  int calls = 0;
  bool reached_end = false;
  EXPECT_THAT(ReturnIfError(false, &calls, &reached_end), IsOk());
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(reached_end);
}

TEST(StatusMacrosTest, ReturnIfErrorReturnsTheError) {
  int calls = 0;
  bool reached_end = false;
  EXPECT_THAT(ReturnIfError(true, &calls, &reached_end),
              StatusIs(absl::StatusCode::kDataLoss, "broken"));
  EXPECT_EQ(calls, 2);  // each expression evaluated once
  EXPECT_FALSE(reached_end);
}

absl::StatusOr<int> ReturnIfErrorInStatusOr() {
  int calls = 0;
  PS_RETURN_IF_ERROR(Fail(&calls));
  return 1;
}

TEST(StatusMacrosTest, ReturnIfErrorWorksInStatusOrFunctions) {
  EXPECT_THAT(ReturnIfErrorInStatusOr(), StatusIs(absl::StatusCode::kDataLoss, "broken"));
}

absl::StatusOr<std::unique_ptr<int>> MakeInt(int value, int* calls) {
  ++*calls;
  if (value < 0) return absl::InvalidArgumentError("negative");
  return std::make_unique<int>(value);
}

absl::StatusOr<int> Sum(int a, int b, int* calls) {
  PS_ASSIGN_OR_RETURN(std::unique_ptr<int> x, MakeInt(a, calls));  // move-only type
  PS_ASSIGN_OR_RETURN(auto y, MakeInt(b, calls));                  // second use, same scope
  int total = *x + *y;
  PS_ASSIGN_OR_RETURN(x, MakeInt(total, calls));  // assign to an existing variable
  return *x;
}

TEST(StatusMacrosTest, AssignOrReturnAssigns) {
  int calls = 0;
  absl::StatusOr<int> sum = Sum(2, 3, &calls);
  ASSERT_THAT(sum, IsOk());
  EXPECT_EQ(*sum, 5);
  EXPECT_EQ(calls, 3);
}

TEST(StatusMacrosTest, AssignOrReturnReturnsTheError) {
  int calls = 0;
  EXPECT_THAT(Sum(2, -1, &calls), StatusIs(absl::StatusCode::kInvalidArgument, "negative"));
  EXPECT_EQ(calls, 2);
  calls = 0;
  EXPECT_THAT(Sum(-1, 3, &calls), StatusIs(absl::StatusCode::kInvalidArgument, "negative"));
  EXPECT_EQ(calls, 1);
}

absl::Status AssignInStatusFunction(int* out) {
  int calls = 0;
  PS_ASSIGN_OR_RETURN(std::unique_ptr<int> x, MakeInt(-5, &calls));
  *out = *x;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, AssignOrReturnWorksInStatusFunctions) {
  int out = 0;
  EXPECT_THAT(AssignInStatusFunction(&out), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(out, 0);
}

}  // namespace
}  // namespace ps
