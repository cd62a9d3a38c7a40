// ServerMetrics on prometheus-cpp: one Registry, exposed by one Exposer (civetweb) on its own port.
// Buckets follow vLLM's (vllm/engine/metrics.py, v1/metrics/loggers.py) with finer lower buckets
// added, because the CPU engine on tiny models answers in milliseconds where vLLM's lowest buckets
// would lump everything together. prometheus-cpp reports errors by exceptions; none leaves here.
#include "server/metrics/metrics.h"

#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

namespace ps::metrics {

absl::string_view FailureReasonName(FailureReason reason) {
  switch (reason) {
    case FailureReason::kValidation:
      return "validation";
    case FailureReason::kRejected:
      return "rejected";
    case FailureReason::kCancelled:
      return "cancelled";
    case FailureReason::kDeadline:
      return "deadline";
    case FailureReason::kInternal:
      return "internal";
  }
  return "internal";
}

namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

// vLLM's TTFT buckets (0.001 .. 2560 s), with 0.1 ms .. 0.5 ms below them.
const Histogram::BucketBoundaries& TtftBuckets() {
  static const auto* buckets = new Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,  0.1,   0.25,  0.5,
      0.75,   1.0,     2.5,    5.0,   7.5,   10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
  return *buckets;
}

// vLLM's inter-token latency buckets (0.01 .. 80 s), with 0.1 ms .. 5 ms below them: a CPU decode
// step of a tiny model takes about a millisecond.
const Histogram::BucketBoundaries& InterTokenBuckets() {
  static const auto* buckets = new Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2,
      0.3,    0.4,     0.5,    0.75,  1.0,    2.5,   5.0,  7.5,   10.0, 20.0,  40.0, 80.0};
  return *buckets;
}

// vLLM's request latency buckets (0.3 .. 7680 s; e2e, queue, prefill, decode), with 0.1 ms ..
// 0.1 s below them.
const Histogram::BucketBoundaries& RequestLatencyBuckets() {
  static const auto* buckets = new Histogram::BucketBoundaries{
      0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01,  0.025, 0.05,  0.1,    0.3,
      0.5,    0.8,    1.0,   1.5,    2.0,   2.5,   5.0,   10.0,  15.0,   20.0,
      30.0,   40.0,   50.0,  60.0,   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
  return *buckets;
}

// One engine step: 100 us .. 10 s, 1-2.5-5 per decade.
const Histogram::BucketBoundaries& StepBuckets() {
  static const auto* buckets =
      new Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                      0.05,   0.1,     0.25,   0.5,   1.0,    2.5,   5.0,  10.0};
  return *buckets;
}

// Sequences per decode step: 1 .. 512, powers of 2.
const Histogram::BucketBoundaries& BatchBuckets() {
  static const auto* buckets =
      new Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
  return *buckets;
}

double Seconds(absl::Duration d) {
  const double s = absl::ToDoubleSeconds(d);
  return s > 0.0 ? s : 0.0;  // clocks can step; a negative latency would corrupt _sum
}

// Resident set size of this process from /proc/self/statm (pages), 0 when unreadable.
double ResidentBytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0.0;
  unsigned long long size_pages = 0;
  unsigned long long resident_pages = 0;
  const int read = std::fscanf(f, "%llu %llu", &size_pages, &resident_pages);
  std::fclose(f);
  if (read != 2) return 0.0;
  const long page_bytes = sysconf(_SC_PAGESIZE);
  return static_cast<double>(resident_pages) * static_cast<double>(page_bytes > 0 ? page_bytes : 0);
}

// What the exposer scrapes: refreshes the scrape-time gauges, then collects the registry.
class ScrapeCollector : public prometheus::Collectable {
 public:
  ScrapeCollector(std::shared_ptr<prometheus::Registry> registry, Gauge* resident_bytes)
      : registry_(std::move(registry)), resident_bytes_(resident_bytes) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    resident_bytes_->Set(ResidentBytes());
    {
      std::lock_guard<std::mutex> lock(hook_mu_);
      if (hook_) hook_();
    }
    return registry_->Collect();
  }

  void SetHook(std::function<void()> hook) {
    std::lock_guard<std::mutex> lock(hook_mu_);
    hook_ = std::move(hook);
  }

 private:
  mutable std::mutex hook_mu_;
  std::function<void()> hook_;
  std::shared_ptr<prometheus::Registry> registry_;
  Gauge* resident_bytes_;  // owned by registry_
};

class PrometheusMetrics final : public ServerMetrics {
 public:
  PrometheusMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
    prometheus::Registry& r = *registry_;
    running_ = &BuildGauge()
                    .Name("polysketch_num_requests_running")
                    .Help("Number of requests holding a state slot (prefilling or decoding).")
                    .Register(r)
                    .Add({});
    waiting_ = &BuildGauge()
                    .Name("polysketch_num_requests_waiting")
                    .Help("Number of requests queued, waiting for a state slot.")
                    .Register(r)
                    .Add({});
    ttft_ = &BuildHistogram()
                 .Name("polysketch_time_to_first_token_seconds")
                 .Help("Time from request arrival to its first generated token, in seconds.")
                 .Register(r)
                 .Add({}, TtftBuckets());
    itl_ = &BuildHistogram()
                .Name("polysketch_inter_token_latency_seconds")
                .Help(
                    "Time between consecutive generated tokens of a request, in seconds "
                    "(one sample per token after the first).")
                .Register(r)
                .Add({}, InterTokenBuckets());
    e2e_ = &BuildHistogram()
                .Name("polysketch_e2e_request_latency_seconds")
                .Help("Time from request arrival to its end (any finish reason), in seconds.")
                .Register(r)
                .Add({}, RequestLatencyBuckets());
    queue_ = &BuildHistogram()
                  .Name("polysketch_request_queue_time_seconds")
                  .Help(
                      "Time a request waited in the queue before getting a state slot, in "
                      "seconds (requests that got one).")
                  .Register(r)
                  .Add({}, RequestLatencyBuckets());
    prefill_ = &BuildHistogram()
                    .Name("polysketch_request_prefill_time_seconds")
                    .Help(
                        "Time from getting a state slot to the prompt fully prefilled, in "
                        "seconds (requests that generated a token).")
                    .Register(r)
                    .Add({}, RequestLatencyBuckets());
    decode_ = &BuildHistogram()
                   .Name("polysketch_request_decode_time_seconds")
                   .Help("Time from a request's first generated token to its end, in seconds.")
                   .Register(r)
                   .Add({}, RequestLatencyBuckets());
    step_ = &BuildHistogram()
                 .Name("polysketch_engine_step_duration_seconds")
                 .Help(
                     "Duration of one engine step (decode batch plus prefill chunk), in "
                     "seconds.")
                 .Register(r)
                 .Add({}, StepBuckets());
    batch_ = &BuildHistogram()
                  .Name("polysketch_decode_batch_size")
                  .Help("Number of sequences advanced by one decode step (steps that decoded).")
                  .Register(r)
                  .Add({}, BatchBuckets());
    prompt_tokens_ = &BuildCounter()
                          .Name("polysketch_prompt_tokens_total")
                          .Help("Number of prompt tokens of requests that got a state slot.")
                          .Register(r)
                          .Add({});
    generation_tokens_ = &BuildCounter()
                              .Name("polysketch_generation_tokens_total")
                              .Help("Number of tokens generated.")
                              .Register(r)
                              .Add({});
    auto& success = BuildCounter()
                        .Name("polysketch_request_success_total")
                        .Help("Number of requests that finished normally, by finish reason.")
                        .Register(r);
    for (engine::FinishReason reason :
         {engine::FinishReason::kLength, engine::FinishReason::kStopString,
          engine::FinishReason::kStopToken}) {
      success_[static_cast<int>(reason)] =
          &success.Add({{"finished_reason", std::string(engine::FinishReasonName(reason))}});
    }
    auto& failure = BuildCounter()
                        .Name("polysketch_request_failure_total")
                        .Help("Number of requests that failed or were refused, by reason.")
                        .Register(r);
    for (FailureReason reason :
         {FailureReason::kValidation, FailureReason::kRejected, FailureReason::kCancelled,
          FailureReason::kDeadline, FailureReason::kInternal}) {
      failure_[static_cast<int>(reason)] =
          &failure.Add({{"reason", std::string(FailureReasonName(reason))}});
    }
    slots_total_ = &BuildGauge()
                        .Name("polysketch_state_slots_capacity")
                        .Help("Number of per-request state slots (the most requests running).")
                        .Register(r)
                        .Add({});
    slots_used_ = &BuildGauge()
                       .Name("polysketch_state_slots_used")
                       .Help("Number of state slots held by running requests.")
                       .Register(r)
                       .Add({});
    attention_memory_ = &BuildGauge()
                             .Name("polysketch_attention_memory_bytes")
                             .Help(
                                 "Bytes of attention memory (sketch state and KV cache) held "
                                 "by running requests, by attention kind of the layers.")
                             .Register(r);
    auto& lookups = BuildCounter()
                        .Name("polysketch_prefix_cache_lookups_total")
                        .Help("Prefix-cache lookups of new requests, by result (hit or miss).")
                        .Register(r);
    cache_hits_ = &lookups.Add({{"result", "hit"}});
    cache_misses_ = &lookups.Add({{"result", "miss"}});
    cache_hit_tokens_ = &BuildCounter()
                             .Name("polysketch_prefix_cache_hit_tokens_total")
                             .Help("Prompt tokens restored from the prefix cache, not prefilled.")
                             .Register(r)
                             .Add({});
    cache_insertions_ = &BuildCounter()
                             .Name("polysketch_prefix_cache_insertions_total")
                             .Help("State snapshots stored in the prefix cache.")
                             .Register(r)
                             .Add({});
    cache_evictions_ = &BuildCounter()
                            .Name("polysketch_prefix_cache_evictions_total")
                            .Help("Prefix-cache snapshots dropped to stay within the budget.")
                            .Register(r)
                            .Add({});
    cache_bytes_ = &BuildGauge()
                        .Name("polysketch_prefix_cache_bytes")
                        .Help("Bytes held by the prefix cache (at most --prefix_cache_bytes).")
                        .Register(r)
                        .Add({});
    cache_entries_ = &BuildGauge()
                          .Name("polysketch_prefix_cache_entries")
                          .Help("State snapshots in the prefix cache.")
                          .Register(r)
                          .Add({});
    sessions_active_ =
        &BuildGauge().Name("polysketch_sessions_active").Help("Open sessions.").Register(r).Add({});
    sessions_bytes_ = &BuildGauge()
                           .Name("polysketch_sessions_bytes")
                           .Help(
                               "Bytes reserved by open sessions (at most "
                               "--session_budget_bytes).")
                           .Register(r)
                           .Add({});
    auto& session_events = BuildCounter()
                               .Name("polysketch_sessions_total")
                               .Help("Session events: opened (or imported), closed, expired.")
                               .Register(r);
    sessions_opened_ = &session_events.Add({{"event", "opened"}});
    sessions_closed_ = &session_events.Add({{"event", "closed"}});
    sessions_expired_ = &session_events.Add({{"event", "expired"}});
    sessions_evicted_ = &session_events.Add({{"event", "evicted"}});
    // The shared state tier (--state_tier; docs/sessions.md, "Shared tier"). Zero without one.
    auto& tier_lookups = BuildCounter()
                             .Name("polysketch_state_tier_lookups_total")
                             .Help(
                                 "Session turns that asked the shared state tier, by result: hit "
                                 "(the tier has the session) or miss (it does not).")
                             .Register(r);
    tier_hits_ = &tier_lookups.Add({{"result", "hit"}});
    tier_misses_ = &tier_lookups.Add({{"result", "miss"}});
    tier_loads_ = &BuildCounter()
                       .Name("polysketch_state_tier_loads_total")
                       .Help(
                           "Session states read from the shared tier (another replica ran the "
                           "last turn, or this one did not hold the session).")
                       .Register(r)
                       .Add({});
    tier_writes_ = &BuildCounter()
                        .Name("polysketch_state_tier_writes_total")
                        .Help("Session states written to the shared tier.")
                        .Register(r)
                        .Add({});
    auto& tier_prefix_lookups = BuildCounter()
                                    .Name("polysketch_state_tier_prefix_lookups_total")
                                    .Help(
                                        "Requests without a session that asked the shared tier "
                                        "for a longer prompt prefix than this replica caches, by "
                                        "result: hit (restored from the tier) or miss.")
                                    .Register(r);
    tier_prefix_hits_ = &tier_prefix_lookups.Add({{"result", "hit"}});
    tier_prefix_misses_ = &tier_prefix_lookups.Add({{"result", "miss"}});
    tier_prefix_tokens_ = &BuildCounter()
                               .Name("polysketch_state_tier_prefix_tokens_total")
                               .Help(
                                   "Prompt tokens restored from prefix snapshots in the shared "
                                   "tier (prefill this replica did not compute).")
                               .Register(r)
                               .Add({});
    tier_prefix_writes_ = &BuildCounter()
                               .Name("polysketch_state_tier_prefix_writes_total")
                               .Help("Prefix snapshots written to the shared tier.")
                               .Register(r)
                               .Add({});
    auto& tier_bytes = BuildCounter()
                           .Name("polysketch_state_tier_bytes_total")
                           .Help(
                               "Bytes of session records and prefix snapshots moved to and from "
                               "the shared tier.")
                           .Register(r);
    tier_bytes_read_ = &tier_bytes.Add({{"direction", "read"}});
    tier_bytes_written_ = &tier_bytes.Add({{"direction", "written"}});
    auto& tier_errors = BuildCounter()
                            .Name("polysketch_state_tier_errors_total")
                            .Help(
                                "Shared-tier failures by kind: unreachable, timeout, full, "
                                "damaged, foreign (another model's state), dropped (write queue "
                                "full), other. The server serves from memory meanwhile.")
                            .Register(r);
    for (int i = 0; i < engine::kNumTierErrors; ++i) {
      tier_errors_[i] = &tier_errors.Add(
          {{"kind", std::string(engine::TierErrorName(static_cast<engine::TierError>(i)))}});
    }
    tier_lease_busy_ = &BuildCounter()
                            .Name("polysketch_state_tier_lease_busy_total")
                            .Help(
                                "Session turns refused because another replica held the "
                                "session's lease.")
                            .Register(r)
                            .Add({});
    tier_queued_ = &BuildGauge()
                        .Name("polysketch_state_tier_queued_writes")
                        .Help("Session and prefix writes waiting for the shared tier.")
                        .Register(r)
                        .Add({});
    tier_queued_bytes_ = &BuildGauge()
                              .Name("polysketch_state_tier_queued_bytes")
                              .Help("State bytes waiting to be written to the shared tier.")
                              .Register(r)
                              .Add({});
    auto& tier_latency = BuildHistogram()
                             .Name("polysketch_state_tier_operation_seconds")
                             .Help("Latency of shared-tier calls, by op (read, write, lease).")
                             .Register(r);
    const Histogram::BucketBoundaries tier_buckets(engine::kTierLatencyBuckets.begin(),
                                                   engine::kTierLatencyBuckets.end());
    for (int i = 0; i < engine::kNumTierOps; ++i) {
      tier_latency_[i] = &tier_latency.Add(
          {{"op", std::string(engine::TierOpName(static_cast<engine::TierOp>(i)))}}, tier_buckets);
    }
    stalled_ = &BuildGauge()
                    .Name("polysketch_engine_stalled")
                    .Help(
                        "1 while the engine thread has made no progress for --watchdog_timeout "
                        "in a step (liveness is NOT_SERVING then), else 0.")
                    .Register(r)
                    .Add({});
    stalls_ = &BuildCounter()
                   .Name("polysketch_engine_stalls_total")
                   .Help("Number of engine stalls the progress watchdog has seen.")
                   .Register(r)
                   .Add({});
    failed_ = &BuildGauge()
                   .Name("polysketch_engine_failed")
                   .Help(
                       "1 once the kernel backend failed for good (liveness and readiness are "
                       "NOT_SERVING then; the server must be restarted), else 0.")
                   .Register(r)
                   .Add({});
    Gauge& resident = BuildGauge()
                          .Name("polysketch_process_resident_memory_bytes")
                          .Help(
                              "Resident set size of the server process, in bytes (read from "
                              "/proc/self/statm at scrape time).")
                          .Register(r)
                          .Add({});
    auth_failures_ = &BuildCounter()
                          .Name("polysketch_auth_failures_total")
                          .Help("Number of calls refused for missing or invalid credentials.")
                          .Register(r)
                          .Add({});
    stream_overflows_ = &BuildCounter()
                             .Name("polysketch_stream_buffer_overflow_total")
                             .Help(
                                 "Number of streams ended with RESOURCE_EXHAUSTED because the "
                                 "client stopped reading and unsent output passed "
                                 "--max_stream_buffer_bytes.")
                             .Register(r)
                             .Add({});
    api_requests_ = &BuildCounter()
                         .Name("polysketch_api_requests_total")
                         .Help(
                             "Requests answered, by API (grpc, http), endpoint (gRPC method or "
                             "HTTP route) and code (gRPC status name or HTTP status).")
                         .Register(r);
    collector_ = std::make_shared<ScrapeCollector>(registry_, &resident);
  }

  // Binds the exposer; prometheus-cpp throws (civetweb's CivetException) when it cannot.
  absl::Status Start(const std::string& listen_address) {
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(listen_address);
      exposer_->RegisterCollectable(collector_);
      const std::vector<int> ports = exposer_->GetListeningPorts();
      if (ports.empty()) {
        return absl::UnavailableError(
            absl::StrCat("metrics: no listening port on ", listen_address));
      }
      port_ = ports.front();
    } catch (const std::exception& e) {
      exposer_.reset();
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", listen_address,
                                                 " (in use, malformed or not local): ", e.what()));
    } catch (...) {
      exposer_.reset();
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", listen_address));
    }
    return absl::OkStatus();
  }

  int port() const override { return port_; }

  void RequestFinished(const engine::FinalResult& result) override {
    const engine::RequestTimings& t = result.timings;
    // A request that never got a slot finishes with zero prefill time and no tokens.
    const bool admitted = result.generated_tokens > 0 || t.prefill > absl::ZeroDuration();
    e2e_->Observe(Seconds(t.total));
    if (admitted) {
      queue_->Observe(Seconds(t.queue));
      prompt_tokens_->Increment(
          static_cast<double>(result.prompt_tokens > 0 ? result.prompt_tokens : 0));
    }
    if (result.generated_tokens > 0) {
      generation_tokens_->Increment(static_cast<double>(result.generated_tokens));
      prefill_->Observe(Seconds(t.prefill));
      ttft_->Observe(Seconds(t.first_token));
      decode_->Observe(Seconds(t.total - t.first_token));
    }
    switch (result.reason) {
      case engine::FinishReason::kLength:
      case engine::FinishReason::kStopString:
      case engine::FinishReason::kStopToken:
        success_[static_cast<int>(result.reason)]->Increment();
        break;
      case engine::FinishReason::kCancelled:
        Failure(FailureReason::kCancelled);
        break;
      case engine::FinishReason::kDeadline:
        Failure(FailureReason::kDeadline);
        break;
      case engine::FinishReason::kError:
        Failure(FailureReason::kInternal);
        break;
    }
  }

  void InterTokenLatency(absl::Duration latency, int64_t tokens) override {
    if (tokens <= 0) return;
    // Tokens that arrive together share the gap evenly: one sample per token, as vLLM's
    // per-output-token histogram, and _sum stays the wall time between tokens.
    const double total = Seconds(latency);
    const double each = total / static_cast<double>(tokens);
    const Histogram::BucketBoundaries& bounds = InterTokenBuckets();
    size_t bucket = 0;  // the first bound >= each (Prometheus buckets are `le`); size(): +Inf
    while (bucket < bounds.size() && each > bounds[bucket]) ++bucket;
    try {
      std::vector<double> increments(bounds.size() + 1, 0.0);
      increments[bucket] = static_cast<double>(tokens);
      itl_->ObserveMultiple(increments, total);
    } catch (...) {
      // Only the allocation can throw; dropping a sample beats an exception on the engine thread.
    }
  }

  void RequestRefused(FailureReason reason) override { Failure(reason); }
  void AuthFailure() override { auth_failures_->Increment(); }
  void StreamBufferOverflow() override { stream_overflows_->Increment(); }
  void ApiRequest(absl::string_view api, absl::string_view endpoint,
                  absl::string_view code) override {
    // Family::Add returns the existing counter for labels it has seen (callers pass names from
    // fixed sets, never raw request data).
    api_requests_
        ->Add({{"api", std::string(api)},
               {"endpoint", std::string(endpoint)},
               {"code", std::string(code)}})
        .Increment();
  }

  void EngineFailed() override { failed_->Set(1.0); }
  void EngineStalled(bool stalled) override {
    stalled_->Set(stalled ? 1.0 : 0.0);
    if (stalled) stalls_->Increment();
  }

  void EngineStep(const engine::StepStats& step) override {
    step_->Observe(Seconds(step.step_time));
    if (step.decode_batch > 0) batch_->Observe(static_cast<double>(step.decode_batch));
  }

  void SetScheduler(const engine::SchedulerStats& stats) override {
    running_->Set(static_cast<double>(stats.running));
    waiting_->Set(static_cast<double>(stats.waiting));
    slots_total_->Set(static_cast<double>(stats.slots_total));
    slots_used_->Set(static_cast<double>(stats.slots_used));
    cache_bytes_->Set(static_cast<double>(stats.prefix_cache.bytes));
    cache_entries_->Set(static_cast<double>(stats.prefix_cache.entries));
    sessions_active_->Set(static_cast<double>(stats.sessions.active));
    sessions_bytes_->Set(static_cast<double>(stats.sessions.bytes));
    // The scheduler counts all-time totals; the counters advance by what is new since the last
    // call (which may come from the engine thread or the main thread).
    std::lock_guard<std::mutex> lock(totals_mu_);
    const engine::PrefixCacheStats& c = stats.prefix_cache;
    const engine::SessionStats& se = stats.sessions;
    Advance(cache_hits_, c.hits, last_cache_.hits);
    Advance(cache_misses_, c.misses, last_cache_.misses);
    Advance(cache_hit_tokens_, c.hit_tokens, last_cache_.hit_tokens);
    Advance(cache_insertions_, c.insertions, last_cache_.insertions);
    Advance(cache_evictions_, c.evictions, last_cache_.evictions);
    Advance(sessions_opened_, se.opened, last_sessions_.opened);
    Advance(sessions_closed_, se.closed, last_sessions_.closed);
    Advance(sessions_expired_, se.expired, last_sessions_.expired);
    Advance(sessions_evicted_, se.evicted, last_sessions_.evicted);
    if (!stats.shared_tier && !stats.shared_prefixes) return;
    // Bytes, errors, latency and the write queue count sessions and prefixes together.
    engine::SessionTierStats t = stats.tier;
    if (stats.shared_prefixes) {
      const engine::PrefixTierStats& p = stats.prefix_tier;
      Advance(tier_prefix_hits_, p.hits, last_prefix_.hits);
      Advance(tier_prefix_misses_, p.misses, last_prefix_.misses);
      Advance(tier_prefix_tokens_, p.tokens, last_prefix_.tokens);
      Advance(tier_prefix_writes_, p.writes, last_prefix_.writes);
      t.bytes_read += p.bytes_read;
      t.bytes_written += p.bytes_written;
      t.queued += p.queued;
      t.queued_bytes += p.queued_bytes;
      for (int i = 0; i < engine::kNumTierErrors; ++i) t.errors[i] += p.errors[i];
      for (int i = 0; i < engine::kNumTierOps; ++i) {
        engine::TierLatency& l = t.latency[i];
        for (size_t b = 0; b < l.buckets.size(); ++b) l.buckets[b] += p.latency[i].buckets[b];
        l.sum_seconds += p.latency[i].sum_seconds;
        l.count += p.latency[i].count;
      }
    }
    tier_queued_->Set(static_cast<double>(t.queued));
    tier_queued_bytes_->Set(static_cast<double>(t.queued_bytes));
    Advance(tier_hits_, t.hits, last_tier_.hits);
    Advance(tier_misses_, t.misses, last_tier_.misses);
    Advance(tier_loads_, t.loads, last_tier_.loads);
    Advance(tier_writes_, t.writes, last_tier_.writes);
    Advance(tier_bytes_read_, t.bytes_read, last_tier_.bytes_read);
    Advance(tier_bytes_written_, t.bytes_written, last_tier_.bytes_written);
    Advance(tier_lease_busy_, t.lease_busy, last_tier_.lease_busy);
    for (int i = 0; i < engine::kNumTierErrors; ++i) {
      Advance(tier_errors_[i], t.errors[i], last_tier_.errors[i]);
    }
    for (int i = 0; i < engine::kNumTierOps; ++i) {
      const engine::TierLatency& now = t.latency[i];
      engine::TierLatency& last = last_tier_.latency[i];
      if (now.count <= last.count) continue;
      std::vector<double> increments(now.buckets.size());
      for (size_t b = 0; b < now.buckets.size(); ++b) {
        increments[b] = static_cast<double>(now.buckets[b] - last.buckets[b]);
      }
      tier_latency_[i]->ObserveMultiple(increments, now.sum_seconds - last.sum_seconds);
      last = now;
    }
  }

  void SetScrapeHook(std::function<void()> hook) override { collector_->SetHook(std::move(hook)); }

  void SetAttentionMemory(absl::string_view kind, int64_t bytes) override {
    try {
      // Family::Add returns the existing gauge for labels it has seen.
      attention_memory_->Add({{"kind", std::string(kind)}}).Set(static_cast<double>(bytes));
    } catch (...) {
      // Only allocation can fail here (the label name is fixed and valid); a missed gauge
      // update is better than an exception through the engine thread.
    }
  }

 private:
  static void Advance(Counter* counter, int64_t total, int64_t& last) {
    if (total > last) counter->Increment(static_cast<double>(total - last));
    last = std::max(last, total);
  }

  void Failure(FailureReason reason) {
    const int i = static_cast<int>(reason);
    if (i >= 0 && i < kNumFailureReasons) failure_[i]->Increment();
  }

  static constexpr int kNumFinishReasons = 6;
  static constexpr int kNumFailureReasons = 5;

  std::shared_ptr<prometheus::Registry> registry_;
  // Owned by registry_.
  Gauge* running_ = nullptr;
  Gauge* waiting_ = nullptr;
  Histogram* ttft_ = nullptr;
  Histogram* itl_ = nullptr;
  Histogram* e2e_ = nullptr;
  Histogram* queue_ = nullptr;
  Histogram* prefill_ = nullptr;
  Histogram* decode_ = nullptr;
  Histogram* step_ = nullptr;
  Histogram* batch_ = nullptr;
  Counter* prompt_tokens_ = nullptr;
  Counter* generation_tokens_ = nullptr;
  Counter* success_[kNumFinishReasons] = {};   // by engine::FinishReason; length/stop only
  Counter* failure_[kNumFailureReasons] = {};  // by FailureReason
  Gauge* slots_total_ = nullptr;
  Gauge* slots_used_ = nullptr;
  Family<Gauge>* attention_memory_ = nullptr;
  Counter* auth_failures_ = nullptr;
  Counter* stream_overflows_ = nullptr;
  Family<Counter>* api_requests_ = nullptr;
  Counter *cache_hits_ = nullptr, *cache_misses_ = nullptr, *cache_hit_tokens_ = nullptr,
          *cache_insertions_ = nullptr, *cache_evictions_ = nullptr;
  Gauge *cache_bytes_ = nullptr, *cache_entries_ = nullptr;
  Gauge *sessions_active_ = nullptr, *sessions_bytes_ = nullptr;
  Counter *sessions_opened_ = nullptr, *sessions_closed_ = nullptr, *sessions_expired_ = nullptr,
          *sessions_evicted_ = nullptr;
  Counter *tier_hits_ = nullptr, *tier_misses_ = nullptr, *tier_loads_ = nullptr,
          *tier_writes_ = nullptr, *tier_bytes_read_ = nullptr, *tier_bytes_written_ = nullptr,
          *tier_lease_busy_ = nullptr;
  Counter* tier_errors_[engine::kNumTierErrors] = {};
  Gauge *tier_queued_ = nullptr, *tier_queued_bytes_ = nullptr;
  Histogram* tier_latency_[engine::kNumTierOps] = {};
  Counter *tier_prefix_hits_ = nullptr, *tier_prefix_misses_ = nullptr,
          *tier_prefix_tokens_ = nullptr, *tier_prefix_writes_ = nullptr;
  engine::SessionTierStats last_tier_;
  engine::PrefixTierStats last_prefix_;
  std::mutex totals_mu_;
  engine::PrefixCacheStats last_cache_;
  engine::SessionStats last_sessions_;
  Gauge* stalled_ = nullptr;
  Counter* stalls_ = nullptr;
  Gauge* failed_ = nullptr;
  std::shared_ptr<ScrapeCollector> collector_;
  int port_ = 0;
  // Last: stopped (its threads joined) before the metrics it serves go away.
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(
    const std::string& listen_address) {
  std::unique_ptr<PrometheusMetrics> metrics;
  try {
    metrics = std::make_unique<PrometheusMetrics>();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("metrics: cannot build the registry: ", e.what()));
  }
  if (absl::Status started = metrics->Start(listen_address); !started.ok()) return started;
  return std::unique_ptr<ServerMetrics>(std::move(metrics));
}

}  // namespace ps::metrics
