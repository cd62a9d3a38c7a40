// The status matchers must fail when they should, or every test built on them proves nothing.
#include "tests/testing/status_matchers.h"

#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <gmock/gmock.h>
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

namespace ps::test {
namespace {

using ::testing::Matches;
using ::testing::Not;

TEST(StatusMatchersTest, IsOkOnStatus) {
  EXPECT_TRUE(Matches(IsOk())(absl::OkStatus()));
  EXPECT_FALSE(Matches(IsOk())(absl::InternalError("boom")));
  EXPECT_THAT(absl::NotFoundError("x"), Not(IsOk()));
}

TEST(StatusMatchersTest, IsOkOnStatusOr) {
  EXPECT_TRUE(Matches(IsOk())(absl::StatusOr<int>(3)));
  EXPECT_FALSE(Matches(IsOk())(absl::StatusOr<int>(absl::DataLossError("x"))));
}

TEST(StatusMatchersTest, StatusIsChecksCode) {
  const absl::Status status = absl::DataLossError("model.safetensors: tensor embed.weight: bad");
  EXPECT_TRUE(Matches(StatusIs(absl::StatusCode::kDataLoss))(status));
  EXPECT_FALSE(Matches(StatusIs(absl::StatusCode::kInvalidArgument))(status));
  EXPECT_FALSE(Matches(StatusIs(absl::StatusCode::kDataLoss))(absl::OkStatus()));
  EXPECT_TRUE(Matches(StatusIs(absl::StatusCode::kOk))(absl::OkStatus()));
}

TEST(StatusMatchersTest, StatusIsChecksSubstring) {
  const absl::StatusOr<std::string> result = absl::DataLossError("f: tensor embed.weight: bad");
  EXPECT_TRUE(Matches(StatusIs(absl::StatusCode::kDataLoss, "embed.weight"))(result));
  EXPECT_TRUE(Matches(StatusIs(absl::StatusCode::kDataLoss, ""))(result));
  EXPECT_FALSE(Matches(StatusIs(absl::StatusCode::kDataLoss, "logit_bias"))(result));
  EXPECT_FALSE(Matches(StatusIs(absl::StatusCode::kNotFound, "embed.weight"))(result));
}

TEST(StatusMatchersTest, DescribesItself) {
  EXPECT_EQ(::testing::DescribeMatcher<absl::Status>(IsOk()), "is OK");
  EXPECT_EQ(::testing::DescribeMatcher<absl::Status>(StatusIs(absl::StatusCode::kNotFound, "x")),
            "has status code NOT_FOUND and a message containing \"x\"");
}

TEST(StatusMatchersTest, AssertOkAndAssignMovesTheValue) {
  PS_ASSERT_OK_AND_ASSIGN(std::string s, absl::StatusOr<std::string>("value"));
  EXPECT_EQ(s, "value");
}

void AssignFromError() {
  PS_ASSERT_OK_AND_ASSIGN(int unused, absl::StatusOr<int>(absl::InternalError("boom")));
  ADD_FAILURE() << "not reached: the assertion above returns";
  (void)unused;
}

TEST(StatusMatchersTest, AssertOkAndAssignFailsOnError) {
  EXPECT_FATAL_FAILURE(AssignFromError(), "boom");
}

}  // namespace
}  // namespace ps::test
