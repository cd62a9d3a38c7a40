// StopChecker: stop token ids, stop strings inside one token and split across tokens, held-back
// text released when a partial match fails, include/exclude of the stop string, min_new_tokens
// deferring stops, max_new_tokens, and validation of the conditions.
#include "server/engine/serving/stop_checker.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr int64_t kVocab = 256;

StopChecker Make(StopConditions conditions) {
  absl::StatusOr<StopChecker> checker = StopChecker::Create(std::move(conditions), kVocab);
  EXPECT_THAT(checker, IsOk());
  return *std::move(checker);
}

// Feeds one token whose id is its first byte (0 for empty text) and returns the step.
StopStep Feed(StopChecker& checker, const std::string& text, int32_t token_id = -1) {
  if (token_id < 0) token_id = text.empty() ? 0 : static_cast<unsigned char>(text[0]);
  absl::StatusOr<StopStep> step = checker.Append(token_id, text);
  EXPECT_THAT(step, IsOk());
  return step.ok() ? *std::move(step) : StopStep{};
}

StopConditions Strings(std::vector<std::string> stops, bool include = false) {
  StopConditions conditions;
  conditions.stop_strings = std::move(stops);
  conditions.include_stop_string = include;
  conditions.max_new_tokens = 100;
  return conditions;
}

TEST(StopCheckerTest, FinishReasonNames) {
  EXPECT_EQ(FinishReasonName(FinishReason::kLength), "length");
  EXPECT_EQ(FinishReasonName(FinishReason::kStopToken), "stop_token");
  EXPECT_EQ(FinishReasonName(FinishReason::kCancelled), "cancelled");
  EXPECT_EQ(FinishReasonName(FinishReason::kDeadline), "deadline");
  EXPECT_EQ(FinishReasonName(FinishReason::kError), "error");
  EXPECT_EQ(FinishReasonName(FinishReason::kStopString), "stop_string");
}

TEST(StopCheckerTest, Validation) {
  StopConditions ok = Strings({"\n\n", "END"});
  ok.stop_token_ids = {0, 255};
  EXPECT_THAT(ok.Validate(kVocab), IsOk());

  StopConditions bad = ok;
  bad.max_new_tokens = -1;
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "max_new_tokens = -1"));
  bad = ok;
  bad.min_new_tokens = -1;
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "min_new_tokens = -1"));
  bad.min_new_tokens = 101;
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "min_new_tokens = 101"));
  bad = ok;
  bad.stop_token_ids = {3, 256};
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "stop_token_ids[1] = 256"));
  bad.stop_token_ids = std::vector<int32_t>(kMaxStopTokenIds + 1, 1);
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "stop_token_ids has"));
  bad = ok;
  bad.stop_strings = {"a", ""};
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "stop_strings[1] has 0 bytes"));
  bad.stop_strings = {std::string(kMaxStopStringBytes + 1, 'x')};
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "stop_strings[0]"));
  bad.stop_strings = {"ok", "\xC3"};
  EXPECT_THAT(bad.Validate(kVocab), StatusIs(kInvalid, "stop_strings[1] is not valid UTF-8"));
  bad.stop_strings = std::vector<std::string>(kMaxStopStrings + 1, "x");
  EXPECT_THAT(StopChecker::Create(bad, kVocab), StatusIs(kInvalid, "stop_strings has"));
}

TEST(StopCheckerTest, StopTokenEndsAndDropsItsTextUnlessIncluded) {
  for (bool include : {false, true}) {
    StopConditions conditions = Strings({}, include);
    conditions.stop_token_ids = {7};
    StopChecker checker = Make(conditions);
    EXPECT_EQ(Feed(checker, "ab", 1).released, "ab");
    const StopStep step = Feed(checker, "<eos>", 7);
    EXPECT_EQ(step.finish_reason, FinishReason::kStopToken);
    EXPECT_EQ(step.released, include ? "<eos>" : "");
    EXPECT_TRUE(checker.finished());
    EXPECT_THAT(checker.Append(1, "x"), StatusIs(absl::StatusCode::kFailedPrecondition));
  }
}

TEST(StopCheckerTest, StopStringWithinOneToken) {
  for (bool include : {false, true}) {
    StopChecker checker = Make(Strings({"STOP"}, include));
    EXPECT_EQ(Feed(checker, "hello ").released, "hello ");
    const StopStep step = Feed(checker, "a STOP b");
    EXPECT_EQ(step.finish_reason, FinishReason::kStopString);
    EXPECT_EQ(step.released, include ? "a STOP" : "a ");  // text after the stop is dropped
  }
}

TEST(StopCheckerTest, StopStringAcrossThreeTokens) {
  for (bool include : {false, true}) {
    StopChecker checker = Make(Strings({"\n\nEND"}, include));
    StopStep a = Feed(checker, "done.\n");
    EXPECT_EQ(a.released, "done.");  // "\n" may start the stop: held back
    EXPECT_EQ(checker.held_back_bytes(), 1);
    StopStep b = Feed(checker, "\nE");
    EXPECT_EQ(b.released, "");
    EXPECT_FALSE(b.finish_reason.has_value());
    EXPECT_EQ(checker.held_back_bytes(), 3);
    StopStep c = Feed(checker, "ND!");
    EXPECT_EQ(c.finish_reason, FinishReason::kStopString);
    EXPECT_EQ(c.released, include ? "\n\nEND" : "");
  }
}

TEST(StopCheckerTest, PartialMatchIsHeldThenReleased) {
  StopChecker checker = Make(Strings({"abc"}));
  EXPECT_EQ(Feed(checker, "xa").released, "x");
  EXPECT_EQ(Feed(checker, "b").released, "");
  EXPECT_EQ(checker.held_back_bytes(), 2);
  // "abd" is not "abc": everything is released, and nothing is lost.
  const StopStep step = Feed(checker, "d");
  EXPECT_EQ(step.released, "abd");
  EXPECT_FALSE(step.finish_reason.has_value());
  EXPECT_EQ(checker.held_back_bytes(), 0);
  // A failed match that itself starts a new one keeps only the new start: "aab" -> "a" | "ab".
  EXPECT_EQ(Feed(checker, "a").released, "");
  EXPECT_EQ(Feed(checker, "ab").released, "a");
  EXPECT_EQ(Feed(checker, "c").finish_reason, FinishReason::kStopString);
}

TEST(StopCheckerTest, ReleaseEndsTheStreamAndGivesBackHeldBytes) {
  StopChecker checker = Make(Strings({"abc"}));
  EXPECT_EQ(Feed(checker, "xab").released, "x");
  EXPECT_EQ(checker.Release(), "ab");  // the stream ended early: "ab" can no longer stop it
  EXPECT_TRUE(checker.finished());
  EXPECT_EQ(checker.held_back_bytes(), 0);
  EXPECT_THAT(checker.Append('c', "c"), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(StopCheckerTest, EarliestOfSeveralStopStringsWins) {
  StopChecker checker = Make(Strings({"world", "lo w"}, /*include=*/true));
  const StopStep step = Feed(checker, "hello world");
  EXPECT_EQ(step.finish_reason, FinishReason::kStopString);
  EXPECT_EQ(step.released, "hello w");
}

TEST(StopCheckerTest, MinNewTokensDefersStops) {
  StopConditions conditions = Strings({"AB"});
  conditions.stop_token_ids = {'!'};
  conditions.min_new_tokens = 3;
  StopChecker checker = Make(conditions);
  EXPECT_EQ(Feed(checker, "!").released, "!");    // token 1: the stop token is ordinary text
  EXPECT_EQ(Feed(checker, "AB").released, "AB");  // token 2: "AB" is ordinary text
  EXPECT_EQ(checker.held_back_bytes(), 0);
  const StopStep third = Feed(checker, "A");  // token 3: still deferred, held as a prefix
  EXPECT_FALSE(third.finish_reason.has_value());
  EXPECT_EQ(checker.held_back_bytes(), 1);
  const StopStep fourth = Feed(checker, "B");  // token 4: the stop completes and counts
  EXPECT_EQ(fourth.finish_reason, FinishReason::kStopString);
  EXPECT_EQ(fourth.released, "");

  StopChecker tokens = Make(conditions);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(Feed(tokens, "!").finish_reason.has_value());
  EXPECT_EQ(Feed(tokens, "!").finish_reason, FinishReason::kStopToken);
}

TEST(StopCheckerTest, MaxNewTokensIsLengthAndReleasesHeldText) {
  StopConditions conditions = Strings({"xyz"});
  conditions.max_new_tokens = 3;
  StopChecker checker = Make(conditions);
  EXPECT_EQ(Feed(checker, "a").released, "a");
  EXPECT_EQ(Feed(checker, "bx").released, "b");
  const StopStep step = Feed(checker, "y");
  EXPECT_EQ(step.finish_reason, FinishReason::kLength);
  EXPECT_EQ(step.released, "xy");
  EXPECT_EQ(checker.num_tokens(), 3);
}

TEST(StopCheckerTest, EmptyTextTokensAndUtf8StopStrings) {
  // A byte tokenizer yields "" while a character is open; the stop is the character itself.
  StopChecker checker = Make(Strings({"\xE2\x82\xAC"}));  // U+20AC EURO SIGN
  EXPECT_EQ(Feed(checker, "5 ").released, "5 ");
  EXPECT_EQ(Feed(checker, "", 0xE2).released, "");
  EXPECT_EQ(Feed(checker, "", 0x82).released, "");
  const StopStep step = Feed(checker, "\xE2\x82\xAC", 0xAC);
  EXPECT_EQ(step.finish_reason, FinishReason::kStopString);
  EXPECT_EQ(step.released, "");
}

}  // namespace
}  // namespace ps::engine
