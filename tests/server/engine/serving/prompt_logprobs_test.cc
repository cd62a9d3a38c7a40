// Prompt log-probabilities (EngineRequest::prompt_logprobs) through the scheduler's chunked
// prefill on the CPU backend: equal to the PyTorch reference's teacher-forced log-probabilities
// on every golden fixture (every attention kind) with chunk sizes that cut blocks unevenly; one
// delta per model chunk, all before the first generated token; max_new_tokens 0; no prefix-cache
// hit; a slow client holding prefill back; refusals; and the memory bound on a 64k-token prompt.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/serving/scheduler.h"
#include "tests/testing/golden.h"
#include "tests/testing/prompt_logprobs_check.h"
#include "tests/testing/recorder.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::Recorder;
using ::ps::test::StatusIs;

// The engine contract (issue 4) gives fp32 logits within 1e-4 of the float64 reference; a
// log-probability is a logit minus the log-sum-exp of its row, so errors of the same order.
// Measured: below 1e-5 on every fixture; the task's bound is 1e-4 absolute.
constexpr double kTol = 1e-4;
constexpr int32_t kTop = 5;

ModelOptions Options(int64_t prefill_chunk, int64_t slots = 2) {
  ModelOptions options;
  options.num_slots = slots;
  options.max_batch = slots;
  options.prefill_chunk = prefill_chunk;
  options.max_context = 4096;  // KV kinds: more than any fixture needs
  return options;
}

EngineRequest ScoreRequest(const std::string& id, std::vector<int32_t> prompt,
                           int64_t max_new_tokens, int32_t top,
                           std::shared_ptr<Recorder> recorder) {
  EngineRequest r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.stops.max_new_tokens = max_new_tokens;
  r.prompt_logprobs = true;
  r.prompt_top_logprobs = top;
  r.observer = std::move(recorder);
  return r;
}

class PromptLogprobsGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  kernels::cpu::CpuBackend backend_{2};
};

// Model chunks of 5 and 3 tokens (blocks are 8) and a scheduler budget of 7 tokens per step, so
// chunks start mid-block, end mid-block and split across steps; also one chunk for the whole
// prompt. Three greedy tokens follow and equal the golden continuation.
TEST_P(PromptLogprobsGoldenTest, EqualTheReferenceLogSoftmaxAtEveryRecordedPosition) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden, test::LoadGoldenFixture(GetParam()));
  const int64_t n = static_cast<int64_t>(golden.tokens.size());
  for (const int64_t chunk : {5, 3, 512}) {
    SCOPED_TRACE(absl::StrCat("prefill_chunk ", chunk));
    SchedulerOptions options;
    options.prefill_tokens_per_step = 7;
    auto scheduler = test::MakeModelScheduler(golden.model_dir, backend_, Options(chunk), options);
    ASSERT_NE(scheduler, nullptr);
    auto recorder = std::make_shared<Recorder>();
    ASSERT_THAT(scheduler->Submit(ScoreRequest("a", golden.tokens, 3, kTop, recorder)), IsOk());
    ASSERT_TRUE(recorder->Wait());
    const FinalResult result = recorder->result();
    ASSERT_EQ(result.reason, FinishReason::kLength) << result.error;
    const double worst =
        test::ExpectPromptLogprobsMatchGolden(golden, recorder->prompt_logprobs(), kTop, kTol);
    EXPECT_EQ(recorder->tokens(),
              std::vector<int32_t>(golden.greedy.begin(), golden.greedy.begin() + 3));
    EXPECT_EQ(recorder->misplaced_prompt_deltas(), 0);
    // One delta per model chunk: never more entries than a chunk has rows.
    const int64_t rows = std::min(chunk, int64_t{7});  // most rows of one model chunk here
    EXPECT_LE(recorder->largest_prompt_delta(), rows);
    EXPECT_GE(recorder->prompt_deltas(), (n - 1 + rows - 1) / rows);
    EXPECT_EQ(result.cached_tokens, 0);
    std::cout << "[ fixture ] " << GetParam() << " chunk " << chunk << ": max |logprob error| "
              << worst << "\n";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PromptLogprobsGoldenTest,
                         ::testing::ValuesIn(test::GoldenFixtureNames()),
                         [](const ::testing::TestParamInfo<std::string>& param_info) {
                           return test::GoldenTestName(param_info.param);
                         });

class PromptLogprobsTest : public ::testing::Test {
 protected:
  std::unique_ptr<Scheduler> Make(const std::string& fixture, int64_t chunk,
                                  SchedulerOptions options = {}) {
    return test::MakeFixtureScheduler(fixture, backend_, Options(chunk), std::move(options));
  }
  kernels::cpu::CpuBackend backend_{2};
};

// max_new_tokens 0 scores without generating; a one-token prompt has nothing to score; the same
// request without prompt_logprobs gets none.
TEST_F(PromptLogprobsTest, ScoringOnlyAndShortPrompts) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden,
                          test::LoadGoldenFixture("polysketch-learned-local"));
  auto scheduler = Make("polysketch-learned-local", 16);
  ASSERT_NE(scheduler, nullptr);
  auto scored = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(ScoreRequest("score", golden.tokens, 0, 2, scored)), IsOk());
  ASSERT_TRUE(scored->Wait());
  EXPECT_EQ(scored->result().reason, FinishReason::kLength);
  EXPECT_EQ(scored->result().generated_tokens, 0);
  EXPECT_TRUE(scored->tokens().empty());
  EXPECT_EQ(scored->text(), "");
  test::ExpectPromptLogprobsMatchGolden(golden, scored->prompt_logprobs(), 2, kTol);

  auto one = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(ScoreRequest("one", {65}, 0, 3, one)), IsOk());
  ASSERT_TRUE(one->Wait());
  EXPECT_EQ(one->result().reason, FinishReason::kLength);
  EXPECT_TRUE(one->prompt_logprobs().empty());
  EXPECT_EQ(one->deltas(), 0);

  auto plain = std::make_shared<Recorder>();
  EngineRequest request = ScoreRequest("plain", golden.tokens, 2, 0, plain);
  request.prompt_logprobs = false;
  ASSERT_THAT(scheduler->Submit(std::move(request)), IsOk());
  ASSERT_TRUE(plain->Wait());
  EXPECT_TRUE(plain->prompt_logprobs().empty());
  EXPECT_EQ(plain->tokens(),
            std::vector<int32_t>(golden.greedy.begin(), golden.greedy.begin() + 2));
}

// A prompt whose prefix is cached: a plain request takes the hit, a scoring one prefills all of
// it (and still scores every token).
TEST_F(PromptLogprobsTest, NoPrefixCacheHit) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden,
                          test::LoadGoldenFixture("polysketch-learned-local"));
  SchedulerOptions options;
  options.prefix_cache.budget_bytes = int64_t{16} << 20;
  options.prefix_cache.granularity = 8;
  auto scheduler = Make("polysketch-learned-local", 16, options);
  ASSERT_NE(scheduler, nullptr);
  for (const char* id : {"warm", "hit"}) {
    auto plain = std::make_shared<Recorder>();
    EngineRequest request = ScoreRequest(id, golden.tokens, 1, 0, plain);
    request.prompt_logprobs = false;
    ASSERT_THAT(scheduler->Submit(std::move(request)), IsOk());
    ASSERT_TRUE(plain->Wait());
    if (std::string(id) == "hit") {
      EXPECT_GT(plain->result().cached_tokens, 0);
    }
  }
  auto scored = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(ScoreRequest("scored", golden.tokens, 1, kTop, scored)), IsOk());
  ASSERT_TRUE(scored->Wait());
  EXPECT_EQ(scored->result().cached_tokens, 0);
  test::ExpectPromptLogprobsMatchGolden(golden, scored->prompt_logprobs(), kTop, kTol);
  EXPECT_EQ(scored->tokens(), std::vector<int32_t>{golden.greedy[0]});
}

// A client that has not read its output (Backlogged) holds the request's prefill back; once it
// reads, the request goes on, with the same result.
TEST_F(PromptLogprobsTest, BackloggedClientHoldsPrefillBack) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden,
                          test::LoadGoldenFixture("polysketch-learned-local"));
  auto scheduler = Make("polysketch-learned-local", 8);
  ASSERT_NE(scheduler, nullptr);
  auto recorder = std::make_shared<Recorder>();
  recorder->SetBacklogged(20);
  ASSERT_THAT(scheduler->Submit(ScoreRequest("slow", golden.tokens, 0, kTop, recorder)), IsOk());
  ASSERT_TRUE(recorder->Wait());
  // Asked before each step's prefill: 20 held steps, then the one that prefills everything.
  EXPECT_EQ(recorder->backlog_queries(), 20 + 1);
  test::ExpectPromptLogprobsMatchGolden(golden, recorder->prompt_logprobs(), kTop, kTol);
}

TEST_F(PromptLogprobsTest, RefusesWhatMakesNoSense) {
  SchedulerOptions options;
  options.sessions.budget_bytes = int64_t{16} << 20;
  auto scheduler = Make("polysketch-learned-local", 16, options);
  ASSERT_NE(scheduler, nullptr);
  auto recorder = std::make_shared<Recorder>();
  EXPECT_THAT(scheduler->Submit(ScoreRequest("a", {1, 2}, 0, kMaxTopLogprobs + 1, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt_top_logprobs"));
  EXPECT_THAT(scheduler->Submit(ScoreRequest("a", {1, 2}, 0, -1, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt_top_logprobs"));
  EngineRequest top_alone = ScoreRequest("a", {1, 2}, 0, 3, recorder);
  top_alone.prompt_logprobs = false;
  EXPECT_THAT(scheduler->Submit(std::move(top_alone)),
              StatusIs(absl::StatusCode::kInvalidArgument, "unless prompt_logprobs"));
  PS_ASSERT_OK_AND_ASSIGN(const std::string session, scheduler->OpenSession(""));
  EngineRequest in_session = ScoreRequest("a", {1, 2}, 0, 0, recorder);
  in_session.session_id = session;
  EXPECT_THAT(scheduler->Submit(std::move(in_session)),
              StatusIs(absl::StatusCode::kInvalidArgument, "not re-scored"));
  EXPECT_THAT(scheduler->Submit(ScoreRequest("a", {1, 2}, -1, 0, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_new_tokens"));
  EXPECT_EQ(recorder->finishes(), 0);
}

// A session turn with max_new_tokens 0 leaves every token in the session's state and none
// pending: the next turn continues as if the text had been sent in one turn.
TEST_F(PromptLogprobsTest, SessionTurnWithoutGeneration) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden,
                          test::LoadGoldenFixture("polysketch-learned-local"));
  SchedulerOptions options;
  options.sessions.budget_bytes = int64_t{16} << 20;
  auto scheduler = Make("polysketch-learned-local", 16, options);
  ASSERT_NE(scheduler, nullptr);
  PS_ASSERT_OK_AND_ASSIGN(const std::string session, scheduler->OpenSession(""));
  const auto half = golden.tokens.begin() + 20;
  auto first = std::make_shared<Recorder>();
  EngineRequest turn1 =
      ScoreRequest("t1", std::vector<int32_t>(golden.tokens.begin(), half), 0, 0, first);
  turn1.prompt_logprobs = false;
  turn1.session_id = session;
  ASSERT_THAT(scheduler->Submit(std::move(turn1)), IsOk());
  ASSERT_TRUE(first->Wait());
  EXPECT_EQ(first->result().reason, FinishReason::kLength);
  auto second = std::make_shared<Recorder>();
  EngineRequest turn2 =
      ScoreRequest("t2", std::vector<int32_t>(half, golden.tokens.end()), 4, 0, second);
  turn2.prompt_logprobs = false;
  turn2.session_id = session;
  ASSERT_THAT(scheduler->Submit(std::move(turn2)), IsOk());
  ASSERT_TRUE(second->Wait());
  EXPECT_EQ(second->result().cached_tokens, 20);
  EXPECT_EQ(second->tokens(),
            std::vector<int32_t>(golden.greedy.begin(), golden.greedy.begin() + 4));
}

// A 64k-token prompt with prompt_logprobs on a tiny constant-state model: every token is scored,
// in deltas of at most one chunk, and the host buffer of all-token logits never holds more than
// prefill_chunk x V floats (a structural check of the bound; 64k x V would be 64 MiB here).
TEST_F(PromptLogprobsTest, LongPromptKeepsTheLogitsBufferAtOneChunk) {
  constexpr int64_t kChunk = 512;
  constexpr int64_t kTokens = int64_t{1} << 16;
  SchedulerOptions options;
  options.prefill_tokens_per_step = 2048;  // several model chunks per step
  ModelConfig config;
  ModelOptions model_options = Options(kChunk, 1);
  model_options.max_context = 0;  // a constant-state model: no context limit
  auto scheduler = test::MakeFixtureScheduler("polysketch-learned-local", backend_, model_options,
                                              options, &config);
  ASSERT_NE(scheduler, nullptr);
  std::vector<int32_t> prompt(static_cast<size_t>(kTokens));
  for (int64_t i = 0; i < kTokens; ++i) prompt[static_cast<size_t>(i)] = 32 + (i * 7919) % 90;
  auto recorder = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(ScoreRequest("long", prompt, 1, 1, recorder)), IsOk());
  ASSERT_TRUE(recorder->Wait(120));
  ASSERT_EQ(recorder->result().reason, FinishReason::kLength) << recorder->result().error;
  const std::vector<TokenOutput> entries = recorder->prompt_logprobs();
  ASSERT_EQ(static_cast<int64_t>(entries.size()), kTokens - 1);
  for (int64_t i = 0; i < kTokens - 1; i += 4099) {
    EXPECT_EQ(entries[static_cast<size_t>(i)].token_id, prompt[static_cast<size_t>(i + 1)]);
    EXPECT_LE(entries[static_cast<size_t>(i)].logprob, 0.0f);
  }
  EXPECT_EQ(recorder->prompt_deltas(), kTokens / kChunk);
  EXPECT_LE(recorder->largest_prompt_delta(), kChunk);
  const int64_t capacity = scheduler->model().chunk_logits_capacity();
  EXPECT_GT(capacity, 0);  // the every-token path ran
  EXPECT_LE(capacity, kChunk * config.vocab_size);
  std::cout << "[ memory ] chunk logits buffer: " << capacity << " floats (bound "
            << kChunk * config.vocab_size << ", the whole prompt would be "
            << kTokens * config.vocab_size << ")\n";
}

}  // namespace
}  // namespace ps::engine
