// The server's Prometheus metrics (prometheus-cpp), served on their own port at /metrics. Names
// are polysketch_* with the semantics of vLLM's vllm:* metrics, so existing dashboards map over:
//   polysketch_num_requests_running / _waiting               gauges
//   polysketch_time_to_first_token_seconds                    histogram
//   polysketch_inter_token_latency_seconds                    histogram (per generated token)
//   polysketch_e2e_request_latency_seconds                    histogram
//   polysketch_request_queue_time_seconds                     histogram
//   polysketch_request_prefill_time_seconds                   histogram
//   polysketch_request_decode_time_seconds                    histogram (first token -> finish)
//   polysketch_engine_step_duration_seconds                   histogram
//   polysketch_decode_batch_size                              histogram
//   polysketch_prompt_tokens_total / _generation_tokens_total counters
//   polysketch_request_success_total{finished_reason}         counter (length, stop_string, ...)
//   polysketch_request_failure_total{reason}                  counter (validation, rejected,
//                                                             cancelled, deadline, internal)
//   polysketch_state_slots_capacity / polysketch_state_slots_used  gauges (a gauge must not end
//                                                             in _total: promtool)
//   polysketch_attention_memory_bytes{kind}                   gauge (state slots in use, by
//                                                             attention kind of the layers)
//   polysketch_process_resident_memory_bytes                  gauge (read at scrape time)
//   polysketch_auth_failures_total                            counter (calls refused for missing
//                                                             or invalid credentials)
//   polysketch_stream_buffer_overflow_total                   counter (streams ended because the
//                                                             client did not read: output past
//                                                             --max_stream_buffer_bytes)
//   polysketch_api_requests_total{api,endpoint,code}          counter (requests by API: grpc or
//                                                             http, endpoint, status code)
//   polysketch_engine_stalled                                 gauge: 1 while the progress
//                                                             watchdog sees the engine stuck
//   polysketch_engine_stalls_total                            counter: stalls seen
//   polysketch_engine_failed                                  gauge: 1 once the backend failed
//                                                             for good (requests that a backend
//                                                             failure ended count as
//                                                             request_failure_total{internal})
//   polysketch_state_tier_*                                   the shared state tier
//                                                             (docs/sessions.md, "Metrics")
// Thread-safe: every method may be called from any thread.
#ifndef POLYSKETCH_SERVER_METRICS_METRICS_H_
#define POLYSKETCH_SERVER_METRICS_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include "server/engine/serving/scheduler_reports.h"

namespace ps::metrics {

// Why a request failed without finishing normally (polysketch_request_failure_total{reason}).
enum class FailureReason {
  kValidation,  // the caller's error before it was queued: INVALID_ARGUMENT, OUT_OF_RANGE,
                //   ALREADY_EXISTS, NOT_FOUND (a session it does not know), FAILED_PRECONDITION
  kRejected,    // RESOURCE_EXHAUSTED (queue full) or UNAVAILABLE (draining)
  kCancelled,   // client cancel or disconnect
  kDeadline,    // deadline or time limit
  kInternal,    // anything else
};
absl::string_view FailureReasonName(FailureReason reason);  // "validation", ...

class ServerMetrics {
 public:
  // Starts the exposer on `listen_address` ("host:port"; port 0 picks a free one). Unavailable
  // (naming the address) when it cannot bind.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(
      const std::string& listen_address);
  // Stops the exposer; civetweb's shutdown takes up to about 2 s (its poll interval).
  virtual ~ServerMetrics() = default;

  // The port the exposer listens on.
  virtual int port() const = 0;

  // A request ended (any finish reason): latency histograms, token counters, success counter for
  // length / stop reasons, failure counter for cancelled / deadline / error (-> "internal").
  // Observes what the request has data for: e2e always; queue time and prompt tokens once it got
  // a slot (generated a token or has prefill time); TTFT, prefill and decode time (first token
  // -> finish) once it generated a token. Call it once per request, whoever ended it.
  virtual void RequestFinished(const engine::FinalResult& result) = 0;
  // `tokens` tokens arrived `latency` after the previous ones of the same request: `tokens`
  // samples of latency / tokens each (the first token of a request is TTFT, not this). Ignored
  // when tokens <= 0.
  virtual void InterTokenLatency(absl::Duration latency, int64_t tokens) = 0;
  // A request refused before it reached the engine (failure counter only; no latency).
  virtual void RequestRefused(FailureReason reason) = 0;
  // One engine step (Scheduler on_step): step duration; batch size when decode_batch > 0.
  virtual void EngineStep(const engine::StepStats& step) = 0;
  // Gauges, refreshed by the server after each step or periodically.
  virtual void SetScheduler(const engine::SchedulerStats& stats) = 0;
  // Bytes of attention memory in use for layers of `kind` ("polysketch", "softmax", ...). A kind
  // appears in the scrape from its first call: call it with 0 for each kind of the model at
  // start.
  virtual void SetAttentionMemory(absl::string_view kind, int64_t bytes) = 0;
  // A call refused as UNAUTHENTICATED (missing or invalid token). (Not pure, like the next one,
  // so that test doubles written before these counters keep compiling.)
  virtual void AuthFailure() {}
  // A stream ended with RESOURCE_EXHAUSTED because its client stopped reading and its unsent
  // output passed the per-stream bound.
  virtual void StreamBufferOverflow() {}
  // A request answered: `api` "grpc" or "http"; `endpoint` the gRPC method ("Generate") or HTTP
  // route ("completions"); `code` the gRPC status name ("OK", "RESOURCE_EXHAUSTED") or the HTTP
  // status ("200", "429"). Each from a fixed set (label cardinality).
  virtual void ApiRequest(absl::string_view /*api*/, absl::string_view /*endpoint*/,
                          absl::string_view /*code*/) {}
  // The progress watchdog's verdict changed (engine/serving/watchdog.h): sets the stalled gauge,
  // and counts a stall when it begins.
  virtual void EngineStalled(bool /*stalled*/) {}
  // Runs `hook` at the start of every scrape, before the metrics are read (the server refreshes
  // the gauges of work done off the engine thread: the shared state tier's writes). An empty
  // function removes it; returns only when no scrape runs the old hook.
  virtual void SetScrapeHook(std::function<void()> /*hook*/) {}
  // The backend failed for good (Scheduler::failure): sets the failed gauge to 1.
  virtual void EngineFailed() {}
};

}  // namespace ps::metrics

#endif  // POLYSKETCH_SERVER_METRICS_METRICS_H_
