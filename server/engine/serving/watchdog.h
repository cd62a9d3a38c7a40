// The engine progress watchdog (issue 8): a monitor thread that reads the scheduler's lock-free
// progress word (Scheduler::Progress) and reports a stall when the engine thread has stayed in
// one phase of a step (decoding, prefilling, ...) for `timeout`, and a recovery when it moves
// again. A stuck engine thread cannot report itself, and a server whose engine is stuck still
// answers health checks from gRPC's threads: without this, Kubernetes' liveness probe would see
// SERVING forever. The server turns liveness NOT_SERVING, sets a metric and logs (main.cc).
//
// The watchdog only reads two atomics of the scheduler, so the engine's hot path has no lock and
// no clock read for it. Stall time is measured by the monitor from the last change it saw, so it
// is exact to one poll interval.
//
// Thread-safety: Check may be called from any one thread at a time (the monitor thread, or a test
// that never calls Start). The listener is called on that thread.
#ifndef POLYSKETCH_SERVER_ENGINE_SERVING_WATCHDOG_H_
#define POLYSKETCH_SERVER_ENGINE_SERVING_WATCHDOG_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include <absl/status/statusor.h>
#include <absl/time/time.h>

#include "server/engine/serving/scheduler.h"

namespace ps::engine {

// A change of the watchdog's verdict.
struct WatchdogEvent {
  bool stalled = false;  // true: a stall began; false: progress resumed after one
  // How long the engine had made no progress: when the stall was reported, or in all when it
  // recovered.
  absl::Duration without_progress;
  EnginePhase phase = EnginePhase::kIdle;  // stalled: where it is stuck; recovered: where it is now
  int64_t running = 0;                     // requests holding a slot at the time
};

struct WatchdogOptions {
  // No progress for this long while in a step is a stall. Must be > 0 (0 disables the watchdog
  // in the server: do not create one).
  absl::Duration timeout = absl::Seconds(30);
  // How often the monitor thread checks; 0 = timeout / 10, clamped to [10 ms, 1 s].
  absl::Duration poll_interval = absl::ZeroDuration();
};

class EngineWatchdog {
 public:
  using Listener = std::function<void(const WatchdogEvent&)>;

  // Watches `scheduler` (not owned; must outlive the watchdog). `listener` hears every change of
  // verdict, in order: stalled, recovered, stalled, ... InvalidArgument for a timeout <= 0, a
  // negative poll interval or no scheduler / listener. Call Start for the monitor thread.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<EngineWatchdog>> Create(
      const Scheduler* scheduler, WatchdogOptions options, Listener listener);
  // Stops and joins the monitor thread.
  ~EngineWatchdog();
  EngineWatchdog(const EngineWatchdog&) = delete;
  EngineWatchdog& operator=(const EngineWatchdog&) = delete;

  // Starts the monitor thread: Check(absl::Now()) every poll interval. Call at most once.
  void Start();

  // One check at time `now` (monotonic in successive calls): reads the scheduler's progress,
  // decides stalled / progressing and calls the listener on a change. Returns the verdict.
  bool Check(absl::Time now);

  bool stalled() const { return stalled_; }  // the thread that calls Check only

 private:
  EngineWatchdog(const Scheduler* scheduler, WatchdogOptions options, Listener listener);

  const Scheduler* const scheduler_;
  const WatchdogOptions options_;
  const Listener listener_;

  // Check's memory (one thread).
  std::optional<uint64_t> last_sequence_;
  absl::Time last_change_;
  bool stalled_ = false;

  std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_SERVING_WATCHDOG_H_
