// ServerMetrics end to end: events in, then the /metrics text scraped over a real socket (a tiny
// blocking HTTP/1.0 GET, so the test needs no HTTP client library).
#include "server/metrics/metrics.h"

#include <arpa/inet.h>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <netinet/in.h>
#include <optional>
#include <string>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/engine/serving/scheduler.h"
#include "server/engine/serving/stop_checker.h"
#include "tests/testing/status_matchers.h"

namespace ps::metrics {
namespace {

using ::ps::test::StatusIs;
using ::testing::HasSubstr;

// GET http://127.0.0.1:<port><path>; the response body, or nullopt on a socket error or a
// status other than 200.
std::optional<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return std::nullopt;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return std::nullopt;
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, 0);
    if (n <= 0) {
      close(fd);
      return std::nullopt;
    }
    sent += static_cast<size_t>(n);
  }
  std::string response;
  char buffer[4096];
  while (true) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n < 0) {
      close(fd);
      return std::nullopt;
    }
    if (n == 0) break;  // HTTP/1.0: the server closes after the body
    response.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos || !absl::StartsWith(response, "HTTP/1.") ||
      response.find(" 200 ") > response.find("\r\n")) {
    return std::nullopt;
  }
  return response.substr(body + 4);
}

// The value of the sample whose name and labels are exactly `series` ("name" or
// "name{label=\"value\"}"), or nullopt when the scrape has no such line.
std::optional<double> Sample(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, series)) continue;
    absl::string_view rest = line.substr(series.size());
    if (!absl::StartsWith(rest, " ")) continue;  // a longer name or other labels
    rest.remove_prefix(1);
    // An optional timestamp follows the value.
    const std::vector<absl::string_view> fields = absl::StrSplit(rest, ' ');
    double value = 0.0;
    if (!absl::SimpleAtod(fields[0], &value)) return std::nullopt;
    return value;
  }
  return std::nullopt;
}

engine::FinalResult Finished(engine::FinishReason reason, int64_t prompt, int64_t generated,
                             absl::Duration queue, absl::Duration first_token,
                             absl::Duration total) {
  engine::FinalResult result;
  result.reason = reason;
  result.prompt_tokens = prompt;
  result.generated_tokens = generated;
  result.timings.queue = queue;
  result.timings.prefill = generated > 0 ? first_token - queue : absl::ZeroDuration();
  result.timings.first_token = generated > 0 ? first_token : absl::ZeroDuration();
  result.timings.total = total;
  return result;
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PS_ASSERT_OK_AND_ASSIGN(metrics_, ServerMetrics::Create("127.0.0.1:0"));
    ASSERT_GT(metrics_->port(), 0);
  }

  std::string Scrape() {
    std::optional<std::string> text = HttpGet(metrics_->port(), "/metrics");
    EXPECT_TRUE(text.has_value()) << "GET /metrics on port " << metrics_->port();
    return text.value_or("");
  }

  std::unique_ptr<ServerMetrics> metrics_;
};

// Every metric that metrics.h lists, with the type it must have.
struct Declared {
  const char* name;
  const char* type;
};
constexpr Declared kDeclared[] = {
    {"polysketch_num_requests_running", "gauge"},
    {"polysketch_num_requests_waiting", "gauge"},
    {"polysketch_time_to_first_token_seconds", "histogram"},
    {"polysketch_inter_token_latency_seconds", "histogram"},
    {"polysketch_e2e_request_latency_seconds", "histogram"},
    {"polysketch_request_queue_time_seconds", "histogram"},
    {"polysketch_request_prefill_time_seconds", "histogram"},
    {"polysketch_request_decode_time_seconds", "histogram"},
    {"polysketch_engine_step_duration_seconds", "histogram"},
    {"polysketch_decode_batch_size", "histogram"},
    {"polysketch_prompt_tokens_total", "counter"},
    {"polysketch_generation_tokens_total", "counter"},
    {"polysketch_request_success_total", "counter"},
    {"polysketch_request_failure_total", "counter"},
    {"polysketch_state_slots_capacity", "gauge"},
    {"polysketch_state_slots_used", "gauge"},
    {"polysketch_attention_memory_bytes", "gauge"},
    {"polysketch_process_resident_memory_bytes", "gauge"},
    {"polysketch_auth_failures_total", "counter"},
    {"polysketch_stream_buffer_overflow_total", "counter"},
    {"polysketch_engine_stalled", "gauge"},
    {"polysketch_engine_stalls_total", "counter"},
    {"polysketch_state_tier_lookups_total", "counter"},
    {"polysketch_state_tier_loads_total", "counter"},
    {"polysketch_state_tier_writes_total", "counter"},
    {"polysketch_state_tier_bytes_total", "counter"},
    {"polysketch_state_tier_errors_total", "counter"},
    {"polysketch_state_tier_lease_busy_total", "counter"},
    {"polysketch_state_tier_queued_writes", "gauge"},
    {"polysketch_state_tier_queued_bytes", "gauge"},
    {"polysketch_state_tier_operation_seconds", "histogram"},
    {"polysketch_state_tier_prefix_lookups_total", "counter"},
    {"polysketch_state_tier_prefix_tokens_total", "counter"},
    {"polysketch_state_tier_prefix_writes_total", "counter"},
};

TEST(FailureReasonNameTest, NamesEveryReason) {
  EXPECT_EQ(FailureReasonName(FailureReason::kValidation), "validation");
  EXPECT_EQ(FailureReasonName(FailureReason::kRejected), "rejected");
  EXPECT_EQ(FailureReasonName(FailureReason::kCancelled), "cancelled");
  EXPECT_EQ(FailureReasonName(FailureReason::kDeadline), "deadline");
  EXPECT_EQ(FailureReasonName(FailureReason::kInternal), "internal");
}

TEST_F(MetricsTest, EveryMetricHasHelpAndType) {
  metrics_->SetAttentionMemory("polysketch", 0);  // a labelled family shows once it has a child
  const std::string text = Scrape();
  for (const Declared& metric : kDeclared) {
    EXPECT_THAT(text, HasSubstr(absl::StrCat("\n# HELP ", metric.name, " ")))
        << metric.name << " in\n"
        << text;
    EXPECT_THAT(text, HasSubstr(absl::StrCat("\n# TYPE ", metric.name, " ", metric.type, "\n")))
        << metric.name;
  }
}

TEST_F(MetricsTest, LabelledCountersStartAtZero) {
  const std::string text = Scrape();
  for (const char* reason : {"length", "stop_string", "stop_token"}) {
    EXPECT_EQ(Sample(text, absl::StrCat("polysketch_request_success_total{finished_reason=\"",
                                        reason, "\"}")),
              0.0)
        << reason;
  }
  for (const char* reason : {"validation", "rejected", "cancelled", "deadline", "internal"}) {
    EXPECT_EQ(
        Sample(text, absl::StrCat("polysketch_request_failure_total{reason=\"", reason, "\"}")),
        0.0)
        << reason;
  }
  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_count"), 0.0);
}

TEST_F(MetricsTest, SecurityCountersCountEachEvent) {
  EXPECT_EQ(Sample(Scrape(), "polysketch_auth_failures_total"), 0.0);
  EXPECT_EQ(Sample(Scrape(), "polysketch_stream_buffer_overflow_total"), 0.0);
  metrics_->AuthFailure();
  metrics_->AuthFailure();
  metrics_->StreamBufferOverflow();
  const std::string text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_auth_failures_total"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_stream_buffer_overflow_total"), 1.0);
}

TEST_F(MetricsTest, FinishedRequestsFillHistogramsAndCounters) {
  using engine::FinishReason;
  metrics_->RequestFinished(Finished(FinishReason::kLength, 10, 4, absl::Milliseconds(1),
                                     absl::Milliseconds(20), absl::Milliseconds(50)));
  metrics_->RequestFinished(Finished(FinishReason::kStopString, 7, 2, absl::Milliseconds(2),
                                     absl::Milliseconds(30), absl::Milliseconds(40)));
  metrics_->RequestFinished(Finished(FinishReason::kStopToken, 5, 1, absl::Milliseconds(3),
                                     absl::Seconds(3), absl::Seconds(3)));
  const std::string text = Scrape();

  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_count"), 3.0);
  EXPECT_NEAR(Sample(text, "polysketch_time_to_first_token_seconds_sum").value_or(-1), 3.05, 1e-9);
  // 20 ms and 30 ms are <= 0.04; 3 s is not <= 2.5.
  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_bucket{le=\"0.04\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_bucket{le=\"2.5\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_e2e_request_latency_seconds_count"), 3.0);
  EXPECT_NEAR(Sample(text, "polysketch_e2e_request_latency_seconds_sum").value_or(-1), 3.09, 1e-9);
  EXPECT_EQ(Sample(text, "polysketch_request_queue_time_seconds_count"), 3.0);
  EXPECT_NEAR(Sample(text, "polysketch_request_queue_time_seconds_sum").value_or(-1), 0.006, 1e-9);
  EXPECT_EQ(Sample(text, "polysketch_request_prefill_time_seconds_count"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_request_decode_time_seconds_count"), 3.0);
  // Decode: first token -> end = 30 ms + 10 ms + 0.
  EXPECT_NEAR(Sample(text, "polysketch_request_decode_time_seconds_sum").value_or(-1), 0.04, 1e-9);

  EXPECT_EQ(Sample(text, "polysketch_prompt_tokens_total"), 10.0 + 7.0 + 5.0);
  EXPECT_EQ(Sample(text, "polysketch_generation_tokens_total"), 4.0 + 2.0 + 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_success_total{finished_reason=\"length\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_success_total{finished_reason=\"stop_string\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_success_total{finished_reason=\"stop_token\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"internal\"}"), 0.0);
}

TEST_F(MetricsTest, FailuresAreLabelledAndKeepTheLatenciesTheyHave) {
  using engine::FinishReason;
  // Cancelled while queued: no slot, no token. Only the e2e latency is known.
  metrics_->RequestFinished(Finished(FinishReason::kCancelled, 100, 0, absl::Milliseconds(5),
                                     absl::ZeroDuration(), absl::Milliseconds(5)));
  // Deadline after 3 tokens: every latency is known.
  metrics_->RequestFinished(Finished(FinishReason::kDeadline, 8, 3, absl::Milliseconds(1),
                                     absl::Milliseconds(10), absl::Milliseconds(100)));
  // Internal error during prefill (had a slot, no token yet).
  engine::FinalResult error = Finished(FinishReason::kError, 6, 0, absl::Milliseconds(1),
                                       absl::ZeroDuration(), absl::Milliseconds(9));
  error.timings.prefill = absl::Milliseconds(8);
  error.error = absl::InternalError("boom");
  metrics_->RequestFinished(error);
  metrics_->RequestRefused(FailureReason::kValidation);
  metrics_->RequestRefused(FailureReason::kValidation);
  metrics_->RequestRefused(FailureReason::kRejected);
  metrics_->RequestRefused(FailureReason::kCancelled);
  const std::string text = Scrape();

  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"validation\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"rejected\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"cancelled\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"deadline\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"internal\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_success_total{finished_reason=\"length\"}"), 0.0);

  EXPECT_EQ(Sample(text, "polysketch_e2e_request_latency_seconds_count"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_request_queue_time_seconds_count"), 2.0);  // got a slot
  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_count"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_prefill_time_seconds_count"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_request_decode_time_seconds_count"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_prompt_tokens_total"), 8.0 + 6.0);  // those with a slot
  EXPECT_EQ(Sample(text, "polysketch_generation_tokens_total"), 3.0);
}

TEST_F(MetricsTest, InterTokenLatencyCountsEveryToken) {
  metrics_->InterTokenLatency(absl::Milliseconds(2), 1);
  metrics_->InterTokenLatency(absl::Milliseconds(30), 3);  // 10 ms each
  metrics_->InterTokenLatency(absl::Milliseconds(5), 0);   // nothing arrived: ignored
  const std::string text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_inter_token_latency_seconds_count"), 4.0);
  EXPECT_NEAR(Sample(text, "polysketch_inter_token_latency_seconds_sum").value_or(-1), 0.032, 1e-9);
  EXPECT_EQ(Sample(text, "polysketch_inter_token_latency_seconds_bucket{le=\"0.0025\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_inter_token_latency_seconds_bucket{le=\"0.01\"}"), 4.0);
}

TEST_F(MetricsTest, EngineStepsAndGauges) {
  engine::StepStats step;
  step.decode_batch = 3;
  step.step_time = absl::Microseconds(700);
  metrics_->EngineStep(step);
  step.decode_batch = 0;  // a prefill-only step: no batch sample
  step.prefill_tokens = 512;
  step.step_time = absl::Milliseconds(20);
  metrics_->EngineStep(step);
  engine::SchedulerStats stats;
  stats.running = 3;
  stats.waiting = 5;
  stats.slots_total = 8;
  stats.slots_used = 3;
  metrics_->SetScheduler(stats);
  metrics_->SetAttentionMemory("polysketch", 4096);
  metrics_->SetAttentionMemory("softmax", 1 << 20);
  metrics_->SetAttentionMemory("polysketch", 8192);  // replaces, not adds
  const std::string text = Scrape();

  EXPECT_EQ(Sample(text, "polysketch_engine_step_duration_seconds_count"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_engine_step_duration_seconds_bucket{le=\"0.001\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_decode_batch_size_count"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_decode_batch_size_bucket{le=\"2\"}"), 0.0);
  EXPECT_EQ(Sample(text, "polysketch_decode_batch_size_bucket{le=\"4\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_decode_batch_size_bucket{le=\"512\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_num_requests_running"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_num_requests_waiting"), 5.0);
  EXPECT_EQ(Sample(text, "polysketch_state_slots_capacity"), 8.0);
  EXPECT_EQ(Sample(text, "polysketch_state_slots_used"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_attention_memory_bytes{kind=\"polysketch\"}"), 8192.0);
  EXPECT_EQ(Sample(text, "polysketch_attention_memory_bytes{kind=\"softmax\"}"), 1048576.0);
}

TEST_F(MetricsTest, PrefixCacheAndSessionTotalsAdvanceByWhatIsNew) {
  engine::SchedulerStats stats;
  stats.prefix_cache = {.hits = 3,
                        .misses = 2,
                        .insertions = 4,
                        .evictions = 1,
                        .entries = 3,
                        .bytes = 12000,
                        .hit_tokens = 96};
  stats.sessions = {.active = 2, .bytes = 8000, .opened = 5, .closed = 2, .expired = 1};
  metrics_->SetScheduler(stats);
  metrics_->SetScheduler(stats);  // the same totals again: no change
  stats.prefix_cache.hits = 7;
  stats.sessions.expired = 3;
  metrics_->SetScheduler(stats);
  const std::string text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_lookups_total{result=\"hit\"}"), 7.0);
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_lookups_total{result=\"miss\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_hit_tokens_total"), 96.0);
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_insertions_total"), 4.0);
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_evictions_total"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_bytes"), 12000.0);
  EXPECT_EQ(Sample(text, "polysketch_prefix_cache_entries"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_sessions_active"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_sessions_bytes"), 8000.0);
  EXPECT_EQ(Sample(text, "polysketch_sessions_total{event=\"opened\"}"), 5.0);
  EXPECT_EQ(Sample(text, "polysketch_sessions_total{event=\"closed\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_sessions_total{event=\"expired\"}"), 3.0);
}

TEST_F(MetricsTest, EngineStallsSetTheGaugeAndCountEachStall) {
  EXPECT_EQ(Sample(Scrape(), "polysketch_engine_stalled"), 0.0);
  EXPECT_EQ(Sample(Scrape(), "polysketch_engine_stalls_total"), 0.0);
  metrics_->EngineStalled(true);
  std::string text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_engine_stalled"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_engine_stalls_total"), 1.0);
  metrics_->EngineStalled(false);
  metrics_->EngineStalled(true);
  metrics_->EngineStalled(false);
  text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_engine_stalled"), 0.0);
  EXPECT_EQ(Sample(text, "polysketch_engine_stalls_total"), 2.0);
}

TEST_F(MetricsTest, EngineFailureSetsTheFailedGauge) {
  EXPECT_EQ(Sample(Scrape(), "polysketch_engine_failed"), 0.0);
  metrics_->EngineFailed();
  EXPECT_EQ(Sample(Scrape(), "polysketch_engine_failed"), 1.0);
}

TEST_F(MetricsTest, ResidentMemoryIsReadAtScrapeTime) {
  const std::optional<double> before = Sample(Scrape(), "polysketch_process_resident_memory_bytes");
  ASSERT_TRUE(before.has_value());
  EXPECT_GT(*before, 1 << 20);  // a process with gtest and civetweb loaded holds over 1 MiB

  // Touch 64 MiB: the next scrape sees it.
  constexpr size_t kBytes = size_t{64} << 20;
  std::vector<char> touched(kBytes, 1);
  const std::optional<double> after = Sample(Scrape(), "polysketch_process_resident_memory_bytes");
  ASSERT_TRUE(after.has_value());
  EXPECT_GT(*after, *before + static_cast<double>(kBytes) / 2) << "touched[7]=" << touched[7];
}

TEST_F(MetricsTest, SecondExposerOnTheSamePortIsUnavailable) {
  const std::string address = absl::StrCat("127.0.0.1:", metrics_->port());
  EXPECT_THAT(ServerMetrics::Create(address), StatusIs(absl::StatusCode::kUnavailable, address));
  // The first one still serves.
  EXPECT_THAT(Scrape(), HasSubstr("polysketch_num_requests_running"));
}

TEST_F(MetricsTest, ConcurrentEventsAreAllCounted) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 500;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this, t] {
      for (int i = 0; i < kPerThread; ++i) {
        metrics_->RequestFinished(Finished(engine::FinishReason::kLength, 2, 1,
                                           absl::Microseconds(1), absl::Microseconds(2),
                                           absl::Microseconds(3)));
        metrics_->InterTokenLatency(absl::Microseconds(100), 1);
        metrics_->RequestRefused(FailureReason::kRejected);
        metrics_->SetAttentionMemory(t % 2 == 0 ? "polysketch" : "softmax", i);
      }
    });
  }
  // Scrapes while the events arrive.
  for (int i = 0; i < 3; ++i) EXPECT_THAT(Scrape(), HasSubstr("polysketch_prompt_tokens_total"));
  for (std::thread& thread : threads) thread.join();
  const std::string text = Scrape();
  constexpr double kEvents = kThreads * kPerThread;
  EXPECT_EQ(Sample(text, "polysketch_time_to_first_token_seconds_count"), kEvents);
  EXPECT_EQ(Sample(text, "polysketch_inter_token_latency_seconds_count"), kEvents);
  EXPECT_EQ(Sample(text, "polysketch_prompt_tokens_total"), 2 * kEvents);
  EXPECT_EQ(Sample(text, "polysketch_request_failure_total{reason=\"rejected\"}"), kEvents);
  EXPECT_EQ(Sample(text, "polysketch_request_success_total{finished_reason=\"length\"}"), kEvents);
}

TEST(MetricsCreateTest, BadAddressIsUnavailable) {
  EXPECT_THAT(ServerMetrics::Create("not-an-address:port"),
              StatusIs(absl::StatusCode::kUnavailable, "not-an-address:port"));
}

TEST_F(MetricsTest, OtherPathsAreNotFound) {
  EXPECT_EQ(HttpGet(metrics_->port(), "/nothing"), std::nullopt);
}

// The shared state tier's totals advance by what is new; its latency buckets become a histogram;
// the scrape hook runs at each scrape.
TEST_F(MetricsTest, StateTierTotalsLatencyAndScrapeHook) {
  engine::SchedulerStats stats;
  stats.shared_tier = true;
  stats.tier.hits = 4;
  stats.tier.misses = 1;
  stats.tier.loads = 2;
  stats.tier.writes = 5;
  stats.tier.bytes_read = 8'000'000;
  stats.tier.bytes_written = 20'000'000;
  stats.tier.errors[static_cast<int>(engine::TierError::kUnreachable)] = 3;
  stats.tier.queued = 1;
  stats.tier.queued_bytes = 4'000'000;
  engine::TierLatency& read = stats.tier.latency[static_cast<int>(engine::TierOp::kRead)];
  read.buckets[2] = 2;  // <= 2.5 ms
  read.buckets[5] = 1;  // <= 25 ms
  read.count = 3;
  read.sum_seconds = 0.03;
  metrics_->SetScheduler(stats);
  metrics_->SetScheduler(stats);  // the same totals again: no change
  int hooks = 0;
  metrics_->SetScrapeHook([&hooks] { ++hooks; });
  std::string text = Scrape();
  EXPECT_EQ(hooks, 1);
  metrics_->SetScrapeHook({});
  EXPECT_EQ(Sample(text, "polysketch_state_tier_lookups_total{result=\"hit\"}"), 4.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_lookups_total{result=\"miss\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_loads_total"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_writes_total"), 5.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_bytes_total{direction=\"read\"}"), 8e6);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_bytes_total{direction=\"written\"}"), 2e7);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_errors_total{kind=\"unreachable\"}"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_errors_total{kind=\"damaged\"}"), 0.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_queued_bytes"), 4e6);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_operation_seconds_count{op=\"read\"}"), 3.0);
  EXPECT_EQ(
      Sample(text, "polysketch_state_tier_operation_seconds_bucket{op=\"read\",le=\"0.0025\"}"),
      2.0);
  EXPECT_EQ(
      Sample(text, "polysketch_state_tier_operation_seconds_bucket{op=\"read\",le=\"0.025\"}"),
      3.0);
  stats.tier.hits = 6;
  read.buckets[0] = 1;
  read.count = 4;
  read.sum_seconds = 0.0302;
  metrics_->SetScheduler(stats);
  text = Scrape();
  EXPECT_EQ(hooks, 1);  // removed
  EXPECT_EQ(Sample(text, "polysketch_state_tier_lookups_total{result=\"hit\"}"), 6.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_operation_seconds_count{op=\"read\"}"), 4.0);
}

// Shared prefixes have their own lookups, tokens and writes; their bytes, errors, latency and
// queue add to the tier's (with or without sessions in the tier).
TEST_F(MetricsTest, SharedPrefixesCountApartAndAddToTheTierTotals) {
  engine::SchedulerStats stats;
  stats.shared_prefixes = true;
  stats.prefix_tier.hits = 2;
  stats.prefix_tier.misses = 7;
  stats.prefix_tier.tokens = 4096;
  stats.prefix_tier.writes = 3;
  stats.prefix_tier.bytes_read = 1'000'000;
  stats.prefix_tier.errors[static_cast<int>(engine::TierError::kDamaged)] = 1;
  stats.prefix_tier.queued = 2;
  engine::TierLatency& write = stats.prefix_tier.latency[static_cast<int>(engine::TierOp::kWrite)];
  write.buckets[4] = 3;  // <= 10 ms
  write.count = 3;
  write.sum_seconds = 0.02;
  metrics_->SetScheduler(stats);
  std::string text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_state_tier_prefix_lookups_total{result=\"hit\"}"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_prefix_lookups_total{result=\"miss\"}"), 7.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_prefix_tokens_total"), 4096.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_prefix_writes_total"), 3.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_bytes_total{direction=\"read\"}"), 1e6);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_errors_total{kind=\"damaged\"}"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_queued_writes"), 2.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_operation_seconds_count{op=\"write\"}"), 3.0);
  // Sessions join: the totals add up, and only what is new is counted.
  stats.shared_tier = true;
  stats.tier.bytes_read = 500'000;
  stats.tier.writes = 1;
  stats.prefix_tier.tokens = 5000;
  metrics_->SetScheduler(stats);
  text = Scrape();
  EXPECT_EQ(Sample(text, "polysketch_state_tier_bytes_total{direction=\"read\"}"), 1.5e6);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_prefix_tokens_total"), 5000.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_writes_total"), 1.0);
  EXPECT_EQ(Sample(text, "polysketch_state_tier_operation_seconds_count{op=\"write\"}"), 3.0);
}

}  // namespace
}  // namespace ps::metrics
