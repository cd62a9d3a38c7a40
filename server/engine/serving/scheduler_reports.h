// What the scheduler reports about its work, apart from the scheduler itself, so that code that
// only records it (server/metrics/) does not depend on the model, the sampler and the scheduler:
// one engine step (StepStats), one finished request (FinalResult), the engine's counters and
// gauges (SchedulerStats).
#ifndef POLYSKETCH_SERVER_ENGINE_SERVING_SCHEDULER_REPORTS_H_
#define POLYSKETCH_SERVER_ENGINE_SERVING_SCHEDULER_REPORTS_H_

#include <cstdint>

#include <absl/status/status.h>
#include <absl/time/time.h>

#include "server/engine/serving/stop_checker.h"
#include "server/engine/state_reuse/prefix_cache.h"
#include "server/engine/state_reuse/prefix_tier.h"
#include "server/engine/state_reuse/session_store.h"

namespace ps::engine {

// One engine step, for metrics.
struct StepStats {
  int64_t decode_batch = 0;    // sequences advanced by the decode step (0: none ran)
  int64_t prefill_tokens = 0;  // prompt tokens prefilled in this step
  absl::Duration decode_time;  // of the decode call (forward + sampling)
  absl::Duration prefill_time;
  absl::Duration step_time;  // the whole step
};

struct RequestTimings {
  absl::Duration queue;        // submit -> admitted to a slot
  absl::Duration prefill;      // admitted -> prompt fully prefilled
  absl::Duration first_token;  // submit -> first token sent
  absl::Duration total;        // submit -> finish
};

struct FinalResult {
  FinishReason reason = FinishReason::kLength;
  absl::Status error;  // kError only
  int64_t prompt_tokens = 0;
  // Tokens of the sequence that this request did not prefill: restored from the prefix cache, or
  // held by its session from earlier requests.
  int64_t cached_tokens = 0;
  int64_t generated_tokens = 0;
  uint64_t seed = 0;
  RequestTimings timings;
};

// Counters and gauges, readable from any thread.
struct SchedulerStats {
  int64_t running = 0;  // requests holding a slot
  int64_t waiting = 0;  // queued requests
  int64_t waiting_tokens = 0;
  int64_t slots_total = 0;
  int64_t slots_used = 0;
  int64_t steps = 0;  // engine steps that did work
  bool draining = false;
  bool failed = false;  // the backend failed for good (Scheduler::failure)
  PrefixCacheStats prefix_cache;
  SessionStats sessions;
  bool shared_tier = false;  // a shared tier holds sessions (then `tier` is meaningful)
  SessionTierStats tier;
  bool shared_prefixes = false;  // a shared tier holds prefixes (then `prefix_tier` is meaningful)
  PrefixTierStats prefix_tier;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_SERVING_SCHEDULER_REPORTS_H_
