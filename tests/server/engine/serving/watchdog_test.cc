// EngineWatchdog over a real Scheduler whose step callback can be made to block (an injected
// stuck step). Time is the test's: Check takes it as an argument, so the stall verdict never
// depends on how fast this machine is. The engine's progress word tells the test when the engine
// is blocked or moving again; the test waits for those states, never for a time.
#include "server/engine/serving/watchdog.h"

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::HasSubstr;

// A gate the engine thread's step callback waits at while it is closed.
class Gate {
 public:
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void Pass() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
};

class NullObserver : public RequestObserver {
 public:
  void OnDelta(StreamDelta) override {}
  void OnFinish(FinalResult) override {}
};

// Events the listener heard, for checks from the test thread.
class Events {
 public:
  EngineWatchdog::Listener Listener() {
    return [this](const WatchdogEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(e);
      cv_.notify_all();
    };
  }
  std::vector<WatchdogEvent> Get() {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }
  // Waits until `n` events were heard; false after a minute (a hang, not a speed check).
  bool WaitFor(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::minutes(1), [&] { return events_.size() >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<WatchdogEvent> events_;
};

class WatchdogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelWeights> weights =
        LoadWeights(test::SourcePath("tests/golden/polysketch-learned-local"));
    ASSERT_THAT(weights.status(), IsOk());
    ModelOptions model_options;
    model_options.num_slots = 2;
    model_options.max_batch = 2;
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(*weights, backend_, model_options);
    ASSERT_THAT(model.status(), IsOk());
    SchedulerOptions options;
    options.on_step = [this](const StepStats&) { gate_.Pass(); };
    absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
        Scheduler::Create(*std::move(model), std::move(options));
    ASSERT_THAT(scheduler.status(), IsOk());
    scheduler_ = *std::move(scheduler);
  }

  void TearDown() override {
    gate_.Open();
    scheduler_.reset();
  }

  // Starts a long request with the gate closed and waits until the engine thread is stuck in
  // the step callback.
  void StallTheEngine() {
    gate_.Close();
    EngineRequest r;
    r.id = "long-" + std::to_string(next_id_++);
    r.prompt = {1, 2, 3};
    r.stops.max_new_tokens = 1 << 20;
    r.observer = std::make_shared<NullObserver>();
    ASSERT_THAT(scheduler_->Submit(std::move(r)), IsOk());
    WaitUntil([&] { return scheduler_->Progress().phase == EnginePhase::kStepCallback; });
  }

  // Polls `done` (1 ms apart) for up to a minute: waits for a state, asserts no timing.
  template <typename F>
  static void WaitUntil(F done) {
    for (int i = 0; i < 60000 && !done(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(done());
  }

  kernels::cpu::CpuBackend backend_{1};
  Gate gate_;
  int next_id_ = 0;
  std::unique_ptr<Scheduler> scheduler_;
};

TEST_F(WatchdogTest, CreateRefusesBadOptions) {
  auto listener = [](const WatchdogEvent&) {};
  EXPECT_THAT(EngineWatchdog::Create(nullptr, {}, listener).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "no scheduler"));
  EXPECT_THAT(EngineWatchdog::Create(scheduler_.get(), {}, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "no listener"));
  WatchdogOptions zero;
  zero.timeout = absl::ZeroDuration();
  EXPECT_THAT(EngineWatchdog::Create(scheduler_.get(), zero, listener).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "timeout: must be > 0"));
  WatchdogOptions negative_poll;
  negative_poll.poll_interval = absl::Seconds(-1);
  EXPECT_THAT(EngineWatchdog::Create(scheduler_.get(), negative_poll, listener).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "poll interval"));
}

TEST_F(WatchdogTest, AStuckStepIsAStallAtTheTimeoutAndRecoversWhenItMoves) {
  Events events;
  WatchdogOptions options;
  options.timeout = absl::Seconds(10);
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<EngineWatchdog> watchdog,
                          EngineWatchdog::Create(scheduler_.get(), options, events.Listener()));
  StallTheEngine();
  const absl::Time t0 = absl::UnixEpoch() + absl::Hours(1);
  EXPECT_FALSE(watchdog->Check(t0));  // first sight of this progress value
  EXPECT_FALSE(watchdog->Check(t0 + absl::Seconds(10) - absl::Nanoseconds(1)));
  EXPECT_TRUE(events.Get().empty());
  EXPECT_TRUE(watchdog->Check(t0 + absl::Seconds(10)));
  ASSERT_EQ(events.Get().size(), 1u);
  EXPECT_TRUE(events.Get()[0].stalled);
  EXPECT_EQ(events.Get()[0].without_progress, absl::Seconds(10));
  EXPECT_EQ(events.Get()[0].phase, EnginePhase::kStepCallback);
  EXPECT_EQ(events.Get()[0].running, 1);
  EXPECT_TRUE(watchdog->Check(t0 + absl::Seconds(20)));  // still stalled, said once
  EXPECT_EQ(events.Get().size(), 1u);

  const uint64_t stuck_at = scheduler_->Progress().sequence;
  gate_.Open();
  WaitUntil([&] { return scheduler_->Progress().sequence != stuck_at; });
  EXPECT_FALSE(watchdog->Check(t0 + absl::Seconds(25)));
  ASSERT_EQ(events.Get().size(), 2u);
  EXPECT_FALSE(events.Get()[1].stalled);
  EXPECT_EQ(events.Get()[1].without_progress, absl::Seconds(25));

  // A second stall is reported again. The engine may not have stepped since the check at
  // t0 + 25 s (it can be caught between entering the step callback and the gate closing), so
  // the next check keeps that time: either way it sees no stall yet, and 11 s later it does.
  StallTheEngine();  // the first request still runs: its next step blocks
  const absl::Time t1 = t0 + absl::Seconds(25);
  EXPECT_FALSE(watchdog->Check(t1));
  EXPECT_TRUE(watchdog->Check(t1 + absl::Seconds(11)));
  ASSERT_EQ(events.Get().size(), 3u);
  EXPECT_TRUE(events.Get()[2].stalled);
  EXPECT_EQ(events.Get()[2].without_progress, absl::Seconds(11));
}

TEST_F(WatchdogTest, AnIdleEngineKeepsMoving) {
  Events events;
  WatchdogOptions options;
  options.timeout = absl::Seconds(30);  // a loaded machine may pause the engine thread a while
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<EngineWatchdog> watchdog,
                          EngineWatchdog::Create(scheduler_.get(), options, events.Listener()));
  // Idle, the engine thread still wakes every 10 ms and steps through its phases, so a
  // real-time watchdog keeps seeing progress while there is no work.
  watchdog->Start();
  const uint64_t first = scheduler_->Progress().sequence;
  WaitUntil([&] { return scheduler_->Progress().sequence > first + 100; });
  EXPECT_EQ(scheduler_->Progress().running, 0);
  watchdog.reset();
  EXPECT_TRUE(events.Get().empty());
}

TEST_F(WatchdogTest, TheMonitorThreadReportsAStallAndTheRecovery) {
  Events events;
  WatchdogOptions options;
  options.timeout = absl::Milliseconds(50);
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<EngineWatchdog> watchdog,
                          EngineWatchdog::Create(scheduler_.get(), options, events.Listener()));
  watchdog->Start();
  StallTheEngine();
  ASSERT_TRUE(events.WaitFor(1));
  EXPECT_TRUE(events.Get()[0].stalled);
  EXPECT_GE(events.Get()[0].without_progress, absl::Milliseconds(50));
  gate_.Open();
  ASSERT_TRUE(events.WaitFor(2));
  EXPECT_FALSE(events.Get()[1].stalled);
  watchdog.reset();  // joins the thread before the scheduler goes
}

TEST(EnginePhaseNameTest, NamesEveryPhase) {
  EXPECT_EQ(EnginePhaseName(EnginePhase::kIdle), "idle");
  EXPECT_EQ(EnginePhaseName(EnginePhase::kDecoding), "decoding");
  EXPECT_EQ(EnginePhaseName(EnginePhase::kPrefilling), "prefilling");
  EXPECT_THAT(std::string(EnginePhaseName(EnginePhase::kEndingRequests)), HasSubstr("ending"));
  EXPECT_THAT(std::string(EnginePhaseName(EnginePhase::kAdmitting)), HasSubstr("admitting"));
  EXPECT_THAT(std::string(EnginePhaseName(EnginePhase::kStepCallback)), HasSubstr("callback"));
}

}  // namespace
}  // namespace ps::engine
