// What the server does when the engine's health changes. The progress watchdog
// (engine/serving/watchdog.h) changes its verdict: liveness (the "" service of grpc.health.v1)
// turns NOT_SERVING on a stall and SERVING again on recovery, so an orchestrator's liveness probe
// restarts a server whose engine is stuck; the polysketch_engine_stalled gauge and stall counter
// follow; one line on stderr says how long the engine made no progress, in which phase, with how
// many requests running.
//
// Thread-safety: the returned listener may be called from any one thread at a time (the
// watchdog's).
#ifndef POLYSKETCH_SERVER_SERVICE_WATCHDOG_LISTENER_H_
#define POLYSKETCH_SERVER_SERVICE_WATCHDOG_LISTENER_H_

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <grpcpp/health_check_service_interface.h>

#include "server/engine/serving/watchdog.h"
#include "server/metrics/metrics.h"

namespace ps::service {

// The log line for `event`, without a trailing newline, e.g. "watchdog: engine stalled: no
// progress for 30.2s while decoding, 4 requests running; liveness NOT_SERVING". With
// `engine_failed`, a recovery says that liveness stays NOT_SERVING.
std::string WatchdogLogLine(const engine::WatchdogEvent& event, bool engine_failed = false);

// What the watchdog's listener and the engine-failure listener of one server share: a lock
// around their liveness writes and whether the engine has failed. A failure is for good, so after
// it the watchdog's "progressing again" must not turn liveness back to SERVING.
struct EngineHealth {
  std::mutex mu;
  bool failed = false;  // guarded by mu
};

// A listener that sets liveness on every health service of `health` (the main server's and the
// probe-only server's) and the stall metrics on `metrics` (may be null; none is owned, all must
// outlive the watchdog) and writes WatchdogLogLine to stderr with the prefix
// "polysketch-server: ". `engine_health` (shared with MakeEngineFailureListener) keeps a failed
// engine's liveness NOT_SERVING.
engine::EngineWatchdog::Listener MakeWatchdogListener(
    std::vector<grpc::HealthCheckServiceInterface*> health, metrics::ServerMetrics* metrics,
    std::shared_ptr<EngineHealth> engine_health);

// What the server does when the engine fails for good (SchedulerOptions::on_failure: a sticky
// backend failure, e.g. a CUDA error): liveness ("") and readiness (kReadinessServiceName) turn
// NOT_SERVING on every health service of `health` and stay so (the process must be restarted:
// an orchestrator's liveness probe does it), the polysketch_engine_failed gauge turns 1, and one
// line on stderr gives the failure. It records the failure in `engine_health`.
std::function<void(const absl::Status&)> MakeEngineFailureListener(
    std::vector<grpc::HealthCheckServiceInterface*> health, metrics::ServerMetrics* metrics,
    std::shared_ptr<EngineHealth> engine_health);

// The log line for an engine failure, without a trailing newline.
std::string EngineFailureLogLine(const absl::Status& failure);

}  // namespace ps::service

#endif  // POLYSKETCH_SERVER_SERVICE_WATCHDOG_LISTENER_H_
