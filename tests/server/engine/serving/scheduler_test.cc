// Scheduler: results equal the offline engine, concurrent requests are independent, cancel and
// deadlines end requests within a step and free their slots, the queue bounds hold, long prompts
// are prefilled in chunks between decode steps, and drain refuses new work.
#include "server/engine/serving/scheduler.h"

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/faulty_backend.h"
#include "tests/testing/files.h"
#include "tests/testing/golden.h"
#include "tests/testing/recorder.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/wait.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

using ::ps::test::Recorder;

class SchedulerTest : public ::testing::Test {
 protected:
  // On `backend` (default: the test's CPU backend).
  std::unique_ptr<Scheduler> Make(const std::string& fixture, int64_t slots,
                                  SchedulerOptions options = {}, int64_t max_context = 0,
                                  kernels::Backend* backend = nullptr) {
    ModelOptions model_options;
    model_options.num_slots = slots;
    model_options.max_batch = slots;
    model_options.prefill_chunk = 16;
    model_options.max_context = max_context;  // 0: unlimited for constant-state models
    return test::MakeFixtureScheduler(fixture, backend != nullptr ? *backend : backend_,
                                      model_options, std::move(options));
  }

  static EngineRequest Request(const std::string& id, std::vector<int32_t> prompt,
                               int64_t max_new_tokens, std::shared_ptr<Recorder> recorder,
                               float temperature = 0.0f, uint64_t seed = 0) {
    EngineRequest r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    r.stops.max_new_tokens = max_new_tokens;
    r.observer = std::move(recorder);
    return r;
  }

  // Waits until the scheduler has no request left (slots freed).
  static void WaitIdle(Scheduler& scheduler) {
    ASSERT_TRUE(test::WaitUntil([&] { return scheduler.Idle(); }, absl::Seconds(6)))
        << "the scheduler is not idle 6 s later";
  }

  kernels::cpu::CpuBackend backend_{2};
};

TEST_F(SchedulerTest, GreedyOutputEqualsTheGoldenContinuation) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden,
                          test::LoadGoldenFixture("polysketch-learned-local"));
  auto scheduler = Make("polysketch-learned-local", 2);
  auto recorder = std::make_shared<Recorder>();
  const int64_t n = static_cast<int64_t>(golden.greedy.size());
  ASSERT_THAT(scheduler->Submit(Request("a", golden.tokens, n, recorder)), IsOk());
  ASSERT_TRUE(recorder->Wait());
  EXPECT_EQ(recorder->tokens(), golden.greedy);
  const FinalResult result = recorder->result();
  EXPECT_EQ(result.reason, FinishReason::kLength);
  EXPECT_EQ(result.prompt_tokens, static_cast<int64_t>(golden.tokens.size()));
  EXPECT_EQ(result.generated_tokens, n);
  EXPECT_GE(result.timings.total, result.timings.first_token);
  EXPECT_EQ(recorder->finishes(), 1);
  WaitIdle(*scheduler);
  EXPECT_EQ(scheduler->Stats().slots_used, 0);
}

// 16 requests with different prompts, lengths and seeds, run concurrently on 6 slots (so they
// queue, join and leave the batch at different steps), each equal to the same request run alone.
TEST_F(SchedulerTest, ConcurrentRequestsEqualTheSameRequestsAlone) {
  auto scheduler = Make("mixed", 6, {}, /*max_context=*/4096);
  auto request = [](int i, std::shared_ptr<Recorder> recorder) {
    std::vector<int32_t> prompt;
    for (int j = 0; j < 3 + 5 * i; ++j) prompt.push_back((i * 31 + j * 7) % 256);
    return Request(absl::StrCat("r", i), prompt, 5 + i % 7, std::move(recorder),
                   i % 2 == 0 ? 0.0f : 1.0f, /*seed=*/100 + i);
  };
  std::vector<std::vector<int32_t>> alone;
  for (int i = 0; i < 16; ++i) {
    auto recorder = std::make_shared<Recorder>();
    ASSERT_THAT(scheduler->Submit(request(i, recorder)), IsOk());
    ASSERT_TRUE(recorder->Wait());
    alone.push_back(recorder->tokens());
  }
  std::vector<std::shared_ptr<Recorder>> recorders;
  for (int i = 0; i < 16; ++i) {
    recorders.push_back(std::make_shared<Recorder>());
    ASSERT_THAT(scheduler->Submit(request(i, recorders.back())), IsOk());
  }
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(recorders[i]->Wait());
    EXPECT_EQ(recorders[i]->tokens(), alone[i]) << "request " << i;
    EXPECT_EQ(recorders[i]->result().generated_tokens, 5 + i % 7);
  }
  WaitIdle(*scheduler);
  EXPECT_EQ(scheduler->Stats().slots_used, 0);
}

TEST_F(SchedulerTest, CancelEndsARunningStreamAndFreesItsSlot) {
  auto scheduler = Make("polysketch-random", 1);
  auto recorder = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("long", {1, 2, 3}, 1000000, recorder)), IsOk());
  ASSERT_TRUE(test::WaitUntil([&] { return recorder->tokens().size() >= 3; })) << "no 3 tokens";
  ASSERT_THAT(scheduler->Cancel("long"), IsOk());
  ASSERT_TRUE(recorder->Wait());
  EXPECT_EQ(recorder->result().reason, FinishReason::kCancelled);
  EXPECT_LT(recorder->result().generated_tokens, 1000000);
  WaitIdle(*scheduler);
  EXPECT_EQ(scheduler->Stats().slots_used, 0);
  EXPECT_THAT(scheduler->Cancel("long"), StatusIs(absl::StatusCode::kNotFound, "long"));
  // The freed slot serves the next request.
  auto next = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("next", {4, 5}, 3, next)), IsOk());
  ASSERT_TRUE(next->Wait());
  EXPECT_EQ(next->result().reason, FinishReason::kLength);
}

TEST_F(SchedulerTest, CancelAndDeadlineEndQueuedRequests) {
  auto scheduler = Make("polysketch-random", 1);
  auto running = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("running", {1}, 1000000, running)), IsOk());
  auto queued = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("queued", {2}, 5, queued)), IsOk());
  auto expiring = std::make_shared<Recorder>();
  EngineRequest late = Request("expiring", {3}, 5, expiring);
  late.deadline = absl::Now() + absl::Milliseconds(30);
  ASSERT_THAT(scheduler->Submit(std::move(late)), IsOk());
  ASSERT_THAT(scheduler->Cancel("queued"), IsOk());
  ASSERT_TRUE(queued->Wait());
  EXPECT_EQ(queued->result().reason, FinishReason::kCancelled);
  EXPECT_EQ(queued->result().generated_tokens, 0);
  ASSERT_TRUE(expiring->Wait());
  EXPECT_EQ(expiring->result().reason, FinishReason::kDeadline);
  EXPECT_TRUE(queued->tokens().empty());
  ASSERT_THAT(scheduler->Cancel("running"), IsOk());
  ASSERT_TRUE(running->Wait());
}

TEST_F(SchedulerTest, CancelCanSayTheDeadlineIsWhy) {
  // The service cancels with kDeadline when the client's own deadline fired (it arrives a little
  // before the server's copy of the deadline); running and queued requests end with it.
  auto scheduler = Make("polysketch-random", 1);
  auto running = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("running", {1, 2}, 1000000, running)), IsOk());
  auto queued = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("queued", {3}, 5, queued)), IsOk());
  ASSERT_TRUE(test::WaitUntil([&] { return !running->tokens().empty(); })) << "no first token";
  EXPECT_THAT(scheduler->Cancel("running", FinishReason::kLength),
              StatusIs(absl::StatusCode::kInvalidArgument, "cancel reason"));
  ASSERT_THAT(scheduler->Cancel("queued", FinishReason::kDeadline), IsOk());
  ASSERT_THAT(scheduler->Cancel("running", FinishReason::kDeadline), IsOk());
  ASSERT_TRUE(running->Wait());
  ASSERT_TRUE(queued->Wait());
  EXPECT_EQ(running->result().reason, FinishReason::kDeadline);
  EXPECT_EQ(queued->result().reason, FinishReason::kDeadline);
  EXPECT_GT(running->result().generated_tokens, 0);
  WaitIdle(*scheduler);
  EXPECT_EQ(scheduler->Stats().slots_used, 0);
}

TEST_F(SchedulerTest, DeadlineEndsARunningRequest) {
  auto scheduler = Make("polysketch-random", 1);
  auto recorder = std::make_shared<Recorder>();
  EngineRequest r = Request("r", {1, 2}, 1000000, recorder);
  r.deadline = absl::Now() + absl::Milliseconds(200);
  ASSERT_THAT(scheduler->Submit(std::move(r)), IsOk());
  ASSERT_TRUE(recorder->Wait());
  EXPECT_EQ(recorder->result().reason, FinishReason::kDeadline);
  EXPECT_GT(recorder->result().generated_tokens, 0);
  WaitIdle(*scheduler);
}

// A passing backend failure ends the requests of the failed forward with kError (Internal, the
// backend named); the engine serves on.
TEST_F(SchedulerTest, BackendFailureEndsTheRunningRequestsWithInternal) {
  test::FaultyBackend faulty(backend_, "faulty");
  std::atomic<int> failures{0};
  SchedulerOptions options;
  options.on_failure = [&failures](const absl::Status&) { failures.fetch_add(1); };
  auto scheduler = Make("polysketch-random", 2, std::move(options), 0, &faulty);
  ASSERT_NE(scheduler, nullptr);
  auto a = std::make_shared<Recorder>();
  auto b = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("a", {1, 2, 3}, 1000000, a)), IsOk());
  ASSERT_THAT(scheduler->Submit(Request("b", {4, 5}, 1000000, b)), IsOk());
  ASSERT_TRUE(test::WaitUntil([&] { return a->tokens().size() >= 3 && b->tokens().size() >= 3; }))
      << "the requests did not start decoding";
  faulty.InjectFailure(absl::InternalError("kernel launch failed"), /*sticky=*/false);
  for (auto& recorder : {a, b}) {
    ASSERT_TRUE(recorder->Wait());
    EXPECT_EQ(recorder->result().reason, FinishReason::kError);
    EXPECT_THAT(recorder->result().error,
                StatusIs(absl::StatusCode::kInternal, "the faulty backend failed"));
  }
  WaitIdle(*scheduler);
  EXPECT_EQ(scheduler->Stats().slots_used, 0);
  EXPECT_FALSE(scheduler->Stats().failed);
  EXPECT_THAT(scheduler->failure(), IsOk());
  EXPECT_EQ(failures.load(), 0);
  auto next = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("next", {4, 5}, 3, next)), IsOk());
  ASSERT_TRUE(next->Wait());
  EXPECT_EQ(next->result().reason, FinishReason::kLength);
}

// A sticky backend failure ends every queued and running request with kError, tells
// on_failure once, and from then on the engine refuses new requests (Unavailable).
TEST_F(SchedulerTest, StickyBackendFailureStopsTheEngine) {
  test::FaultyBackend faulty(backend_, "faulty");
  std::mutex mu;
  std::vector<absl::Status> failures;
  SchedulerOptions options;
  options.on_failure = [&](const absl::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    failures.push_back(status);
  };
  auto scheduler = Make("polysketch-random", 1, std::move(options), 0, &faulty);
  ASSERT_NE(scheduler, nullptr);
  auto running = std::make_shared<Recorder>();
  auto queued = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("running", {1, 2, 3}, 1000000, running)), IsOk());
  ASSERT_TRUE(test::WaitUntil([&] { return running->tokens().size() >= 3; }))
      << "the request did not start decoding";
  ASSERT_THAT(scheduler->Submit(Request("queued", {4, 5}, 3, queued)), IsOk());
  faulty.InjectFailure(absl::InternalError("device lost"), /*sticky=*/true);
  // The queued request ends after on_failure was called: its end is the test's sync point.
  for (auto& recorder : {running, queued}) {
    ASSERT_TRUE(recorder->Wait());
    EXPECT_EQ(recorder->result().reason, FinishReason::kError);
    EXPECT_THAT(recorder->result().error, StatusIs(absl::StatusCode::kInternal, "device lost"));
  }
  WaitIdle(*scheduler);
  EXPECT_TRUE(scheduler->Stats().failed);
  EXPECT_THAT(scheduler->failure(), StatusIs(absl::StatusCode::kInternal, "(for good)"));
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(failures.size(), 1u);
    EXPECT_THAT(failures[0], StatusIs(absl::StatusCode::kInternal, "device lost"));
  }
  EXPECT_THAT(scheduler->Submit(Request("late", {1}, 1, std::make_shared<Recorder>())),
              StatusIs(absl::StatusCode::kUnavailable, "the engine failed"));
}

TEST_F(SchedulerTest, FullQueueIsRefusedAtOnce) {
  SchedulerOptions options;
  options.max_waiting = 2;
  options.max_waiting_tokens = 100;
  auto scheduler = Make("polysketch-random", 1, options);
  std::vector<std::shared_ptr<Recorder>> recorders;
  for (int i = 0; i < 8; ++i) recorders.push_back(std::make_shared<Recorder>());
  ASSERT_THAT(scheduler->Submit(Request("run", {1}, 1000000, recorders[0])), IsOk());
  // Wait until it holds the slot, so the next ones queue.
  ASSERT_TRUE(test::WaitUntil([&] { return scheduler->Stats().running != 0; })) << "never ran";
  ASSERT_THAT(scheduler->Submit(Request("q1", {1}, 1, recorders[1])), IsOk());
  ASSERT_THAT(scheduler->Submit(Request("q2", {1}, 1, recorders[2])), IsOk());
  EXPECT_THAT(scheduler->Submit(Request("q3", {1}, 1, recorders[3])),
              StatusIs(absl::StatusCode::kResourceExhausted, "queue is full"));
  ASSERT_THAT(scheduler->Cancel("q2"), IsOk());
  ASSERT_TRUE(recorders[2]->Wait());
  // By prompt tokens: 1 queued + 100 > 100.
  EXPECT_THAT(scheduler->Submit(Request("big", std::vector<int32_t>(100, 1), 1, recorders[4])),
              StatusIs(absl::StatusCode::kResourceExhausted, "prompt tokens"));
  EXPECT_EQ(scheduler->Stats().waiting, 1);
  ASSERT_THAT(scheduler->Cancel("run"), IsOk());
  ASSERT_TRUE(recorders[1]->Wait());
  EXPECT_EQ(recorders[1]->result().reason, FinishReason::kLength);
}

TEST_F(SchedulerTest, InvalidRequestsAreRefusedWithTheFieldNamed) {
  auto scheduler = Make("softmax", 1, {}, /*max_context=*/16);
  auto recorder = std::make_shared<Recorder>();
  EXPECT_THAT(scheduler->Submit(Request("", {1}, 1, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "request id"));
  EXPECT_THAT(scheduler->Submit(Request("a", {}, 1, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt"));
  EXPECT_THAT(scheduler->Submit(Request("a", {1, 256}, 1, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "ids[1]: 256"));
  EXPECT_THAT(scheduler->Submit(Request("a", std::vector<int32_t>(17, 1), 1, recorder)),
              StatusIs(absl::StatusCode::kOutOfRange, "context limit 16"));
  EXPECT_THAT(scheduler->Submit(Request("a", {1}, -1, recorder)),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_new_tokens"));
  EngineRequest bad = Request("a", {1}, 1, recorder);
  bad.sampling.top_p = 0;
  EXPECT_THAT(scheduler->Submit(std::move(bad)),
              StatusIs(absl::StatusCode::kInvalidArgument, "top_p"));
  EXPECT_THAT(scheduler->Submit(Request("a", {1}, 1, nullptr)),
              StatusIs(absl::StatusCode::kInvalidArgument, "observer"));
  EXPECT_EQ(recorder->finishes(), 0);
  // Generation that reaches the context limit ends there: 10 prompt tokens, limit 16 -> the 7th
  // token has no position to be fed at.
  ASSERT_THAT(scheduler->Submit(Request("fits", std::vector<int32_t>(10, 65), 100, recorder)),
              IsOk());
  ASSERT_TRUE(recorder->Wait());
  EXPECT_EQ(recorder->result().reason, FinishReason::kLength);
  EXPECT_EQ(recorder->result().generated_tokens, 7);
}

TEST_F(SchedulerTest, DuplicateIdsAreRefused) {
  auto scheduler = Make("polysketch-random", 1);
  auto a = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("same", {1}, 1000000, a)), IsOk());
  EXPECT_THAT(scheduler->Submit(Request("same", {1}, 1, std::make_shared<Recorder>())),
              StatusIs(absl::StatusCode::kAlreadyExists, "same"));
  ASSERT_THAT(scheduler->Cancel("same"), IsOk());
  ASSERT_TRUE(a->Wait());
}

// A long prompt is prefilled over many steps while a running stream keeps getting tokens.
TEST_F(SchedulerTest, LongPromptsArePrefilledBetweenDecodeSteps) {
  SchedulerOptions options;
  options.prefill_tokens_per_step = 16;
  std::mutex mu;
  std::vector<StepStats> steps;
  options.on_step = [&](const StepStats& s) {
    std::lock_guard<std::mutex> lock(mu);
    steps.push_back(s);
  };
  auto scheduler = Make("polysketch-random-local", 2, options);
  auto stream = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("stream", {1, 2}, 1000000, stream)), IsOk());
  ASSERT_TRUE(test::WaitUntil([&] { return stream->tokens().size() >= 2; })) << "no 2 tokens";
  auto longp = std::make_shared<Recorder>();
  std::vector<int32_t> prompt(800);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(i % 251);
  ASSERT_THAT(scheduler->Submit(Request("long", prompt, 1, longp)), IsOk());
  ASSERT_TRUE(longp->Wait());
  ASSERT_THAT(scheduler->Cancel("stream"), IsOk());
  ASSERT_TRUE(stream->Wait());
  // 800 tokens in steps of at most 16, each of which also advanced the stream.
  std::lock_guard<std::mutex> lock(mu);
  int64_t prefill_steps = 0, with_decode = 0;
  for (const StepStats& s : steps) {
    EXPECT_LE(s.prefill_tokens, 16);
    if (s.prefill_tokens > 0) {
      ++prefill_steps;
      if (s.decode_batch > 0) ++with_decode;
    }
  }
  EXPECT_GE(prefill_steps, 50);
  EXPECT_GE(with_decode, 49);  // all but possibly the step that admitted it
}

TEST_F(SchedulerTest, DrainRefusesNewRequestsAndFinishesRunningOnes) {
  auto scheduler = Make("polysketch-random", 2);
  auto running = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("r", {1, 2, 3}, 20, running)), IsOk());
  scheduler->StartDrain();
  EXPECT_TRUE(scheduler->Stats().draining);
  EXPECT_THAT(scheduler->Submit(Request("new", {1}, 1, std::make_shared<Recorder>())),
              StatusIs(absl::StatusCode::kUnavailable, "draining"));
  ASSERT_TRUE(running->Wait());
  EXPECT_EQ(running->result().reason, FinishReason::kLength);
  EXPECT_EQ(running->result().generated_tokens, 20);
  WaitIdle(*scheduler);
}

TEST_F(SchedulerTest, CancelAllEndsQueuedAndRunningRequestsThroughTheirObservers) {
  // The end of a drain: everything left ends as cancelled, each observer hears it once, and the
  // scheduler keeps working afterwards (it is not shutting down).
  auto scheduler = Make("polysketch-random", 1);
  auto running = std::make_shared<Recorder>();
  auto queued = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("running", {1}, 1000000, running)), IsOk());
  ASSERT_THAT(scheduler->Submit(Request("queued", {2}, 5, queued)), IsOk());
  ASSERT_TRUE(test::WaitUntil([&] { return !running->tokens().empty(); })) << "no first token";
  EXPECT_EQ(scheduler->CancelAll(), 2);
  ASSERT_TRUE(running->Wait());
  ASSERT_TRUE(queued->Wait());
  EXPECT_EQ(running->result().reason, FinishReason::kCancelled);
  EXPECT_EQ(queued->result().reason, FinishReason::kCancelled);
  WaitIdle(*scheduler);
  EXPECT_EQ(scheduler->Stats().slots_used, 0);
  EXPECT_EQ(running->finishes(), 1);
  EXPECT_EQ(queued->finishes(), 1);
  EXPECT_EQ(scheduler->CancelAll(), 0);
  auto next = std::make_shared<Recorder>();
  ASSERT_THAT(scheduler->Submit(Request("next", {3}, 3, next)), IsOk());
  ASSERT_TRUE(next->Wait());
  EXPECT_EQ(next->result().reason, FinishReason::kLength);
}

TEST_F(SchedulerTest, DestructionCancelsEverythingOutstanding) {
  auto a = std::make_shared<Recorder>();
  auto b = std::make_shared<Recorder>();
  {
    auto scheduler = Make("polysketch-random", 1);
    ASSERT_THAT(scheduler->Submit(Request("a", {1}, 1000000, a)), IsOk());
    ASSERT_THAT(scheduler->Submit(Request("b", {1}, 5, b)), IsOk());
  }
  EXPECT_EQ(a->finishes(), 1);
  EXPECT_EQ(b->finishes(), 1);
  EXPECT_EQ(b->result().reason, FinishReason::kCancelled);
}

TEST_F(SchedulerTest, StopStringsAndSeedsWork) {
  auto scheduler = Make("polysketch-learned-local", 2);
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden,
                          test::LoadGoldenFixture("polysketch-learned-local"));
  // The golden greedy text starts "\t\t\tjjjj": stop at "jj".
  auto stop = std::make_shared<Recorder>();
  EngineRequest r = Request("stop", golden.tokens, 10, stop);
  r.stops.stop_strings = {"jj"};
  ASSERT_THAT(scheduler->Submit(std::move(r)), IsOk());
  ASSERT_TRUE(stop->Wait());
  EXPECT_EQ(stop->result().reason, FinishReason::kStopString);
  EXPECT_EQ(stop->text(), "\t\t\t");
  // Same seed, same sampled output.
  std::vector<std::vector<int32_t>> outputs;
  for (int i = 0; i < 2; ++i) {
    auto recorder = std::make_shared<Recorder>();
    ASSERT_THAT(scheduler->Submit(Request(absl::StrCat("s", i), {65, 66}, 30, recorder, 1.0f, 7)),
                IsOk());
    ASSERT_TRUE(recorder->Wait());
    EXPECT_EQ(recorder->result().seed, 7u);
    outputs.push_back(recorder->tokens());
  }
  EXPECT_EQ(outputs[0], outputs[1]);
}

}  // namespace
}  // namespace ps::engine
