// The effects of the engine's health on the server: liveness, readiness, metrics, log
// (watchdog_listener.h).
#include "server/service/watchdog_listener.h"

#include <cstdio>

#include <absl/strings/str_cat.h>
#include <absl/time/time.h>

#include "server/service/generation_service.h"

namespace ps::service {

std::string WatchdogLogLine(const engine::WatchdogEvent& event, bool engine_failed) {
  // Rounded to 0.1 s: the watchdog measures to one poll interval, no finer.
  const std::string seconds =
      absl::FormatDuration(absl::Trunc(event.without_progress, absl::Milliseconds(100)));
  if (event.stalled) {
    return absl::StrCat("watchdog: engine stalled: no progress for ", seconds, " while ",
                        engine::EnginePhaseName(event.phase), ", ", event.running,
                        event.running == 1 ? " request" : " requests",
                        " running; liveness NOT_SERVING");
  }
  return absl::StrCat(
      "watchdog: engine progressing again after ", seconds, " without progress; ",
      engine_failed ? "liveness stays NOT_SERVING (the engine failed)" : "liveness SERVING");
}

engine::EngineWatchdog::Listener MakeWatchdogListener(
    std::vector<grpc::HealthCheckServiceInterface*> health, metrics::ServerMetrics* metrics,
    std::shared_ptr<EngineHealth> engine_health) {
  return [health = std::move(health), metrics,
          engine_health = std::move(engine_health)](const engine::WatchdogEvent& event) {
    bool failed = false;
    {
      std::lock_guard<std::mutex> lock(engine_health->mu);
      failed = engine_health->failed;
      if (!failed) {
        for (grpc::HealthCheckServiceInterface* h : health) h->SetServingStatus("", !event.stalled);
      }
    }
    if (metrics != nullptr) metrics->EngineStalled(event.stalled);
    std::fprintf(stderr, "polysketch-server: %s\n", WatchdogLogLine(event, failed).c_str());
    std::fflush(stderr);
  };
}

std::string EngineFailureLogLine(const absl::Status& failure) {
  return absl::StrCat("engine failed: ", failure.message(),
                      "; every request ended, liveness and readiness NOT_SERVING (restart the "
                      "server)");
}

std::function<void(const absl::Status&)> MakeEngineFailureListener(
    std::vector<grpc::HealthCheckServiceInterface*> health, metrics::ServerMetrics* metrics,
    std::shared_ptr<EngineHealth> engine_health) {
  return [health = std::move(health), metrics,
          engine_health = std::move(engine_health)](const absl::Status& failure) {
    {
      std::lock_guard<std::mutex> lock(engine_health->mu);
      engine_health->failed = true;
      for (grpc::HealthCheckServiceInterface* h : health) {
        h->SetServingStatus(kReadinessServiceName, false);
        h->SetServingStatus("", false);
      }
    }
    if (metrics != nullptr) metrics->EngineFailed();
    std::fprintf(stderr, "polysketch-server: %s\n", EngineFailureLogLine(failure).c_str());
    std::fflush(stderr);
  };
}

}  // namespace ps::service
