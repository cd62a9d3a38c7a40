// gMock matchers for absl::Status and absl::StatusOr (Debian's Abseil does not ship them):
//   EXPECT_THAT(status_or_statusor, IsOk());
//   EXPECT_THAT(LoadWeights(dir), StatusIs(absl::StatusCode::kDataLoss, "embed.weight"));
// and PS_ASSERT_OK_AND_ASSIGN(lhs, rexpr), which fails the test on an error status.
#ifndef POLYSKETCH_TESTS_TESTING_STATUS_MATCHERS_H_
#define POLYSKETCH_TESTS_TESTING_STATUS_MATCHERS_H_

#include <optional>
#include <ostream>
#include <string>
#include <utility>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/status_macros.h"

namespace ps::test {
namespace internal {

inline const absl::Status& GetStatus(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

class IsOkMatcher {
 public:
  template <typename T>
  bool MatchAndExplain(const T& value, ::testing::MatchResultListener* listener) const {
    const absl::Status& status = GetStatus(value);
    if (!status.ok()) *listener << "whose status is " << status;
    return status.ok();
  }
  void DescribeTo(std::ostream* os) const { *os << "is OK"; }
  void DescribeNegationTo(std::ostream* os) const { *os << "is not OK"; }
};

class StatusIsMatcher {
 public:
  StatusIsMatcher(absl::StatusCode code, std::optional<std::string> substring)
      : code_(code), substring_(std::move(substring)) {}

  template <typename T>
  bool MatchAndExplain(const T& value, ::testing::MatchResultListener* listener) const {
    const absl::Status& status = GetStatus(value);
    *listener << "whose status is " << status;
    if (status.code() != code_) return false;
    return !substring_.has_value() || status.message().find(*substring_) != absl::string_view::npos;
  }
  void DescribeTo(std::ostream* os) const {
    *os << "has status code " << absl::StatusCodeToString(code_);
    if (substring_.has_value()) *os << " and a message containing \"" << *substring_ << "\"";
  }
  void DescribeNegationTo(std::ostream* os) const {
    *os << "does not have status code " << absl::StatusCodeToString(code_);
    if (substring_.has_value()) *os << " with a message containing \"" << *substring_ << "\"";
  }

 private:
  absl::StatusCode code_;
  std::optional<std::string> substring_;
};

}  // namespace internal

// Matches an OK absl::Status or an absl::StatusOr<T> that holds a value.
inline ::testing::PolymorphicMatcher<internal::IsOkMatcher> IsOk() {
  return ::testing::MakePolymorphicMatcher(internal::IsOkMatcher());
}

// Matches a status (or StatusOr) with exactly `code`.
inline ::testing::PolymorphicMatcher<internal::StatusIsMatcher> StatusIs(absl::StatusCode code) {
  return ::testing::MakePolymorphicMatcher(internal::StatusIsMatcher(code, std::nullopt));
}

// Matches a status (or StatusOr) with exactly `code` whose message contains `substring`.
inline ::testing::PolymorphicMatcher<internal::StatusIsMatcher> StatusIs(absl::StatusCode code,
                                                                         std::string substring) {
  return ::testing::MakePolymorphicMatcher(internal::StatusIsMatcher(code, std::move(substring)));
}

}  // namespace ps::test

// Evaluates `rexpr` (an absl::StatusOr<T>); fails the current test (ASSERT) when it holds an
// error, else moves the value into `lhs` (a declaration or an existing variable). Several
// statements: use on its own, in a function returning void (as every ASSERT_*).
#define PS_ASSERT_OK_AND_ASSIGN(lhs, rexpr)                                                    \
  PS_ASSERT_OK_AND_ASSIGN_IMPL_(PS_STATUS_MACROS_CONCAT_(ps_test_statusor_, __COUNTER__), lhs, \
                                rexpr)
#define PS_ASSERT_OK_AND_ASSIGN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                  \
  ASSERT_TRUE(statusor.ok()) << statusor.status();          \
  lhs = *std::move(statusor)

#endif  // POLYSKETCH_TESTS_TESTING_STATUS_MATCHERS_H_
