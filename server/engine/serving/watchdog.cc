// EngineWatchdog: polls Scheduler::Progress and reports stalls and recoveries (watchdog.h).
#include "server/engine/serving/watchdog.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>

namespace ps::engine {

absl::StatusOr<std::unique_ptr<EngineWatchdog>> EngineWatchdog::Create(const Scheduler* scheduler,
                                                                       WatchdogOptions options,
                                                                       Listener listener) {
  if (scheduler == nullptr) return absl::InvalidArgumentError("watchdog: no scheduler");
  if (!listener) return absl::InvalidArgumentError("watchdog: no listener");
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("watchdog timeout: must be > 0, got ", absl::FormatDuration(options.timeout)));
  }
  if (options.poll_interval < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("watchdog poll interval: must be >= 0, got ",
                                                   absl::FormatDuration(options.poll_interval)));
  }
  if (options.poll_interval == absl::ZeroDuration()) {
    options.poll_interval =
        std::clamp(options.timeout / 10, absl::Milliseconds(10), absl::Seconds(1));
  }
  return std::unique_ptr<EngineWatchdog>(
      new EngineWatchdog(scheduler, options, std::move(listener)));
}

EngineWatchdog::EngineWatchdog(const Scheduler* scheduler, WatchdogOptions options,
                               Listener listener)
    : scheduler_(scheduler), options_(options), listener_(std::move(listener)) {}

EngineWatchdog::~EngineWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void EngineWatchdog::Start() {
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      lock.unlock();
      Check(absl::Now());
      lock.lock();
      wake_.wait_for(lock, absl::ToChronoNanoseconds(options_.poll_interval),
                     [this] { return stopping_; });
    }
  });
}

bool EngineWatchdog::Check(absl::Time now) {
  const EngineProgress progress = scheduler_->Progress();
  if (!last_sequence_.has_value() || progress.sequence != *last_sequence_) {
    const absl::Duration without_progress = now - last_change_;
    last_sequence_ = progress.sequence;
    last_change_ = now;
    if (stalled_) {
      stalled_ = false;
      listener_({.stalled = false,
                 .without_progress = without_progress,
                 .phase = progress.phase,
                 .running = progress.running});
    }
    return false;
  }
  // Idle between steps with no request holding a slot is no stall: the engine is waiting for
  // work. With requests running it never waits, so idle that lasts means it is stuck taking the
  // scheduler's mutex.
  const bool has_work = progress.phase != EnginePhase::kIdle || progress.running > 0;
  const absl::Duration without_progress = now - last_change_;
  if (!stalled_ && has_work && without_progress >= options_.timeout) {
    stalled_ = true;
    listener_({.stalled = true,
               .without_progress = without_progress,
               .phase = progress.phase,
               .running = progress.running});
  }
  return stalled_;
}

}  // namespace ps::engine
