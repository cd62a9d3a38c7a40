// polysketch-loadgen: drives GenerateStream at a fixed concurrency or at a Poisson request rate
// over one channel with the gRPC callback API, and reports requests/s, generated tokens/s, time to
// first token, inter-token latency and end-to-end latency percentiles, and the final status of
// every request by gRPC code. For soak runs (scripts/soak): --duration, prompt lengths mixed
// between --prompt_bytes_min and --prompt_bytes_max, --cancel_fraction (cancels at a random point
// of the stream, also before the first token) and --expected_codes (codes that do not fail it).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/flags/usage.h>
#include <absl/flags/usage_config.h>
#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <absl/time/time.h>
#include <grpcpp/grpcpp.h>

#include "clients/common/connection.h"
#include "clients/common/connection_flags.h"
#include "clients/loadgen/http_stream.h"
#include "clients/loadgen/scenarios.h"
#include "polysketch/v1/generation.grpc.pb.h"

// --target and the TLS and token flags: clients/common/connection_flags.h.
ABSL_FLAG(std::string, api, "grpc",
          "grpc: GenerateStream on --target; http: streamed POST /v1/completions (the "
          "OpenAI-compatible API) on --http_target, one keep-alive connection per concurrent "
          "request (--concurrency only; plaintext; tokens from --token / --token_file).");
ABSL_FLAG(std::string, http_target, "localhost:8000", "The HTTP API's address (--api http).");
ABSL_FLAG(int32_t, concurrency, 0,
          "Fixed concurrency: keep this many streams open (default 1 when --rate is not set).");
ABSL_FLAG(double, rate, 0.0,
          "Open loop: start requests at this Poisson rate (requests/s), however many are open.");
ABSL_FLAG(int32_t, num_requests, 0,
          "Requests to send; 0 = no count limit (then --duration must be set). Default: 100 when "
          "neither this nor --duration is given.");
ABSL_FLAG(absl::Duration, duration, absl::ZeroDuration(),
          "Stop starting requests after this long (e.g. 60s); 0 = no time limit.");
ABSL_FLAG(int32_t, prompt_bytes, 256,
          "Prompt length in bytes (random lowercase words, different per request).");
ABSL_FLAG(int32_t, prompt_bytes_min, 0,
          "With --prompt_bytes_max: each prompt's length is drawn log-uniformly from "
          "[--prompt_bytes_min, --prompt_bytes_max] (many short prompts, a long tail), "
          "instead of --prompt_bytes.");
ABSL_FLAG(int32_t, prompt_bytes_max, 0, "See --prompt_bytes_min; 0 = fixed --prompt_bytes.");
ABSL_FLAG(std::string, prompt_file, "",
          "Take prompts from this file instead (cut or repeated to --prompt_bytes when > 0).");
ABSL_FLAG(int32_t, max_new_tokens, 128,
          "max_new_tokens of every request (sent as given: 0 generates nothing).");
ABSL_FLAG(std::string, temperature, "",
          "Sampling temperature of every request; empty leaves it unset (server default).");
ABSL_FLAG(double, cancel_fraction, 0.0,
          "Cancel this fraction of streams at a random point: after a uniform number of tokens "
          "in [0, max_new_tokens) (0: right after the call starts, often while it is queued).");
ABSL_FLAG(std::string, expected_codes, "",
          "Comma-separated gRPC codes (e.g. RESOURCE_EXHAUSTED,DEADLINE_EXCEEDED) that are "
          "counted but do not make the exit status 1.");
ABSL_FLAG(absl::Duration, timeout, absl::ZeroDuration(), "gRPC deadline per request; 0 = none.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the load generator (prompts, arrivals, cancel choice).");
ABSL_FLAG(bool, json, false, "Also print the report as one JSON object on stdout.");
ABSL_FLAG(std::string, scenario, "",
          "Instead of the load above, run a conversation-shaped workload one request at a time "
          "(clients/loadgen/scenarios.h): chat (--turns, --turn_bytes, --sessions) or "
          "shared_prefix (--requests, --system_bytes, --user_bytes). Uses --max_new_tokens, "
          "--timeout, --seed, --json.");
ABSL_FLAG(int32_t, turns, 10, "chat: turns of the conversation.");
ABSL_FLAG(int32_t, turn_bytes, 4000, "chat: bytes of user text per turn.");
ABSL_FLAG(bool, sessions, false,
          "chat: keep the conversation in a server session (send only each new turn) instead of "
          "resending it all.");
ABSL_FLAG(int32_t, requests, 32, "shared_prefix: requests.");
ABSL_FLAG(int32_t, system_bytes, 16000, "shared_prefix: bytes of the shared system prompt.");
ABSL_FLAG(int32_t, user_bytes, 200, "shared_prefix: bytes of each request's own text.");

namespace {

namespace pb = ::polysketch::v1;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN_CODE";
}

// What one finished request contributes to the report.
struct Outcome {
  grpc::StatusCode code = grpc::StatusCode::OK;
  bool cancelled_by_us = false;
  bool got_first_token = false;
  double ttft_seconds = 0;
  double e2e_seconds = 0;
  uint64_t tokens = 0;
  uint64_t prompt_tokens = 0;
  std::vector<double> itl_seconds;  // one entry per token of each message after the first
  double tpot_seconds = -1;         // (last token - first token) / (tokens - 1); -1: < 2 tokens
};

// Aggregates outcomes; tracks requests in flight. Thread-safe.
class Collector {
 public:
  void Started() {
    std::lock_guard<std::mutex> lock(mu_);
    ++in_flight_;
  }
  void Finished(Outcome outcome) {
    std::lock_guard<std::mutex> lock(mu_);
    --in_flight_;
    outcomes_.push_back(std::move(outcome));
    cv_.notify_all();
  }
  // Blocks until fewer than `limit` requests are in flight (or `until` passes).
  void WaitBelow(int limit, Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_until(lock, until, [&] { return in_flight_ < limit; });
  }
  void WaitAll() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return in_flight_ == 0; });
  }
  std::vector<Outcome> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::move(outcomes_);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int in_flight_ = 0;
  std::vector<Outcome> outcomes_;
};

// One GenerateStream call; deletes itself when done.
class StreamCall : public grpc::ClientReadReactor<pb::GenerateStreamResponse> {
 public:
  StreamCall(pb::GenerationService::Stub* stub, const ps::clients::Connection& connection,
             pb::GenerateRequest request, bool cancel, uint32_t cancel_after_tokens,
             absl::Duration timeout, Collector* collector)
      : request_(std::move(request)),
        cancel_(cancel),
        cancel_after_tokens_(cancel_after_tokens),
        collector_(collector) {
    if (timeout > absl::ZeroDuration()) {
      context_.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    }
    ps::clients::Authorize(connection, &context_);
    collector_->Started();
    start_ = Clock::now();
    stub->async()->GenerateStream(&context_, &request_, this);
    StartRead(&response_);
    const bool cancel_now = cancel_ && cancel_after_tokens_ == 0;
    if (cancel_now) {
      outcome_.cancelled_by_us = true;
      AddHold();  // OnDone (which deletes this) waits until the cancel below is done
    }
    StartCall();
    if (cancel_now) {
      context_.TryCancel();
      RemoveHold();
    }
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const Clock::time_point now = Clock::now();
    const int n = response_.tokens_size();
    if (n > 0) {
      if (!outcome_.got_first_token) {
        outcome_.got_first_token = true;
        outcome_.ttft_seconds = Seconds(now - start_);
        first_token_ = now;
      } else {
        // Tokens that arrive together share the gap since the previous message. Tokens that came
        // with the first one have no gap to measure: they count in TPOT, not here.
        const double gap = Seconds(now - last_token_) / n;
        for (int i = 0; i < n; ++i) outcome_.itl_seconds.push_back(gap);
      }
      last_token_ = now;
      outcome_.tokens += static_cast<uint64_t>(n);
      streamed_tokens_ += static_cast<uint64_t>(n);
    }
    if (response_.has_final()) {
      outcome_.prompt_tokens = response_.final().prompt_tokens();
      outcome_.tokens = std::max<uint64_t>(outcome_.tokens, response_.final().generated_tokens());
    }
    if (cancel_ && !outcome_.cancelled_by_us && outcome_.tokens >= cancel_after_tokens_) {
      outcome_.cancelled_by_us = true;
      context_.TryCancel();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    outcome_.code = status.error_code();
    if (streamed_tokens_ >= 2) {
      outcome_.tpot_seconds =
          Seconds(last_token_ - first_token_) / static_cast<double>(streamed_tokens_ - 1);
    }
    outcome_.e2e_seconds = Seconds(Clock::now() - start_);
    Collector* collector = collector_;
    Outcome outcome = std::move(outcome_);
    delete this;
    collector->Finished(std::move(outcome));
  }

 private:
  grpc::ClientContext context_;
  pb::GenerateRequest request_;
  pb::GenerateStreamResponse response_;
  const bool cancel_;
  const uint32_t cancel_after_tokens_;
  Collector* const collector_;
  Clock::time_point start_;
  Clock::time_point first_token_;
  Clock::time_point last_token_;
  uint64_t streamed_tokens_ = 0;  // tokens received in messages (final counts may differ)
  Outcome outcome_;
};

// Prompts of `bytes` bytes (or a length drawn log-uniformly from [min_bytes, max_bytes] when
// max_bytes > 0): random words, or windows of --prompt_file.
class PromptSource {
 public:
  PromptSource(std::string file_text, int bytes, int min_bytes, int max_bytes)
      : text_(std::move(file_text)),
        fixed_bytes_(bytes),
        min_bytes_(min_bytes),
        max_bytes_(max_bytes) {}

  std::string Next(std::mt19937_64& rng) const {
    int bytes = fixed_bytes_;
    if (max_bytes_ > 0) {
      std::uniform_real_distribution<double> log_len(std::log(static_cast<double>(min_bytes_)),
                                                     std::log(static_cast<double>(max_bytes_)));
      bytes =
          std::clamp(static_cast<int>(std::lround(std::exp(log_len(rng)))), min_bytes_, max_bytes_);
    }
    if (!text_.empty()) {
      if (bytes <= 0) return text_;
      std::string out;
      out.reserve(static_cast<size_t>(bytes));
      size_t pos = rng() % text_.size();
      while (out.size() < static_cast<size_t>(bytes)) {
        const size_t take = std::min(text_.size() - pos, static_cast<size_t>(bytes) - out.size());
        out.append(text_, pos, take);
        pos = 0;
      }
      return out;
    }
    std::string out;
    out.reserve(static_cast<size_t>(bytes));
    std::uniform_int_distribution<int> letter('a', 'z');
    std::uniform_int_distribution<int> word_len(2, 9);
    while (out.size() < static_cast<size_t>(bytes)) {
      if (!out.empty()) out.push_back(' ');
      for (int i = word_len(rng); i > 0; --i) out.push_back(static_cast<char>(letter(rng)));
    }
    out.resize(static_cast<size_t>(std::max(bytes, 0)));
    return out;
  }

 private:
  std::string text_;
  int fixed_bytes_;
  int min_bytes_;
  int max_bytes_;
};

// Nearest-rank percentile of sorted values; 0 when empty.
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

struct Distribution {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
  size_t count = 0;
};

Distribution Summarize(std::vector<double> values) {
  Distribution d;
  std::sort(values.begin(), values.end());
  d.count = values.size();
  if (values.empty()) return d;
  double sum = 0;
  for (double v : values) sum += v;
  d.mean = sum / static_cast<double>(values.size());
  d.p50 = Percentile(values, 50);
  d.p90 = Percentile(values, 90);
  d.p99 = Percentile(values, 99);
  d.max = values.back();
  return d;
}

std::string DistributionJson(const Distribution& d) {
  return absl::StrFormat(
      "{\"count\": %d, \"mean\": %.6f, \"p50\": %.6f, \"p90\": %.6f, \"p99\": %.6f, "
      "\"max\": %.6f}",
      d.count, d.mean, d.p50, d.p90, d.p99, d.max);
}

std::string DistributionText(const char* name, const Distribution& d) {
  return absl::StrFormat("%-22s mean %9.3f  p50 %9.3f  p90 %9.3f  p99 %9.3f  max %9.3f ms (n=%d)\n",
                         name, d.mean * 1e3, d.p50 * 1e3, d.p90 * 1e3, d.p99 * 1e3, d.max * 1e3,
                         d.count);
}

// The gRPC code an HTTP answer corresponds to (the report counts statuses by gRPC code).
grpc::StatusCode HttpCode(const ps::loadgen::HttpStreamResult& r) {
  switch (r.status) {
    case 200:
      return r.error.empty() ? grpc::StatusCode::OK : grpc::StatusCode::INTERNAL;
    case 0:
    case 503:
      return grpc::StatusCode::UNAVAILABLE;
    case 400:
    case 413:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case 401:
      return grpc::StatusCode::UNAUTHENTICATED;
    case 404:
      return grpc::StatusCode::NOT_FOUND;
    case 429:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case 504:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    default:
      return grpc::StatusCode::INTERNAL;
  }
}

// --api http: `concurrency` workers, each on its own keep-alive connection, send streamed
// completions one after another until `num_requests` (0: no limit) or `end_by`. Returns how many
// were sent.
int RunHttp(const std::string& host, int port, const std::string& authorization, int concurrency,
            int num_requests, std::chrono::steady_clock::time_point end_by,
            const PromptSource& prompts, int max_new_tokens, const std::string& temperature,
            uint64_t seed, Collector* collector) {
  std::atomic<int> next{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < concurrency; ++w) {
    workers.emplace_back([&, w] {
      std::mt19937_64 rng(seed * 1000003 + static_cast<uint64_t>(w));
      ps::loadgen::HttpConnection connection(host, port, authorization);
      for (;;) {
        const int i = next.fetch_add(1);
        if ((num_requests > 0 && i >= num_requests) || Clock::now() >= end_by) {
          next.fetch_sub(1);
          return;
        }
        const std::string body = absl::StrCat(
            "{\"prompt\": ", ps::loadgen::JsonString(prompts.Next(rng)),
            ", \"max_tokens\": ", max_new_tokens,
            temperature.empty() ? "" : absl::StrCat(", \"temperature\": ", temperature),
            ", \"stream\": true, \"stream_options\": {\"include_usage\": true}}");
        collector->Started();
        const ps::loadgen::HttpStreamResult r = connection.StreamCompletion(body);
        Outcome o;
        o.code = HttpCode(r);
        if (o.code != grpc::StatusCode::OK && i == 0) {
          std::cerr << "polysketch-loadgen: HTTP " << r.status << ": " << r.error << "\n";
        }
        o.got_first_token = r.got_first_event;
        o.ttft_seconds = r.ttft_seconds;
        o.e2e_seconds = r.e2e_seconds;
        o.tokens = r.completion_tokens;
        o.prompt_tokens = r.prompt_tokens;
        o.itl_seconds = r.event_gaps_seconds;
        if (r.completion_tokens >= 2) {
          o.tpot_seconds = r.first_to_last_seconds / static_cast<double>(r.completion_tokens - 1);
        }
        collector->Finished(std::move(o));
      }
    });
  }
  for (std::thread& t : workers) t.join();
  return next.load();
}

int Usage(const std::string& message) {
  std::cerr << "polysketch-loadgen: " << message << " (see --help)\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "polysketch-loadgen --target host:port [--concurrency N | --rate R] [--num_requests N] "
      "[--duration D] [--prompt_bytes B] [--max_new_tokens T] [--json]\n"
      "Streams GenerateStream requests and reports throughput, latency percentiles (TTFT, "
      "inter-token, end-to-end), errors and final statuses by gRPC code. Exit 0 when every "
      "request succeeded (or was cancelled by --cancel_fraction, or ended with one of "
      "--expected_codes), 1 when any other failed, 2 on usage errors.");
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view path) {
    return absl::StrContains(path, "polysketch_loadgen") ||
           ps::clients::IsConnectionFlagsFile(path);
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) return Usage(absl::StrCat("unexpected argument ", positional[1]));

  const double rate = absl::GetFlag(FLAGS_rate);
  int concurrency = absl::GetFlag(FLAGS_concurrency);
  int num_requests = absl::GetFlag(FLAGS_num_requests);
  const absl::Duration duration = absl::GetFlag(FLAGS_duration);
  const double cancel_fraction = absl::GetFlag(FLAGS_cancel_fraction);
  const int max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  if (rate < 0) return Usage("--rate must be >= 0");
  if (rate > 0 && concurrency > 0) return Usage("give --concurrency or --rate, not both");
  if (rate == 0 && concurrency == 0) concurrency = 1;
  if (concurrency < 0) return Usage("--concurrency must be >= 1");
  if (num_requests < 0) return Usage("--num_requests must be >= 0");
  if (duration < absl::ZeroDuration()) return Usage("--duration must be >= 0");
  if (num_requests == 0 && duration == absl::ZeroDuration()) num_requests = 100;
  if (cancel_fraction < 0 || cancel_fraction > 1) return Usage("--cancel_fraction: [0, 1]");
  if (max_new_tokens < 0) return Usage("--max_new_tokens must be >= 0");
  if (absl::GetFlag(FLAGS_prompt_bytes) < 0) return Usage("--prompt_bytes must be >= 0");
  const int prompt_bytes_min = absl::GetFlag(FLAGS_prompt_bytes_min);
  const int prompt_bytes_max = absl::GetFlag(FLAGS_prompt_bytes_max);
  if (prompt_bytes_max < 0) return Usage("--prompt_bytes_max must be >= 0");
  if (prompt_bytes_max > 0 && (prompt_bytes_min < 1 || prompt_bytes_min > prompt_bytes_max)) {
    return Usage("--prompt_bytes_min must be in [1, --prompt_bytes_max]");
  }
  if (prompt_bytes_max == 0 && prompt_bytes_min != 0) {
    return Usage("--prompt_bytes_min needs --prompt_bytes_max");
  }
  std::set<std::string> expected_codes;
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_expected_codes), ',', absl::SkipWhitespace())) {
    const std::string code(absl::StripAsciiWhitespace(name));
    bool known = false;
    for (int i = 0; i < 17; ++i) {
      known = known || code == CodeName(static_cast<grpc::StatusCode>(i));
    }
    if (!known) return Usage("--expected_codes: unknown gRPC code " + code);
    expected_codes.insert(code);
  }

  std::string file_text;
  if (!absl::GetFlag(FLAGS_prompt_file).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_prompt_file), std::ios::binary);
    if (!in) return Usage("cannot read --prompt_file " + absl::GetFlag(FLAGS_prompt_file));
    std::ostringstream text;
    text << in.rdbuf();
    file_text = text.str();
    if (file_text.empty()) return Usage("--prompt_file is empty");
  }
  const PromptSource prompts(std::move(file_text), absl::GetFlag(FLAGS_prompt_bytes),
                             prompt_bytes_min, prompt_bytes_max);
  float temperature = 0;
  const std::string temperature_text = absl::GetFlag(FLAGS_temperature);
  if (!temperature_text.empty() && !absl::SimpleAtof(temperature_text, &temperature)) {
    return Usage("--temperature: cannot parse " + temperature_text);
  }

  const std::string api = absl::GetFlag(FLAGS_api);
  if (api != "grpc" && api != "http") return Usage("--api: grpc or http, got " + api);
  const ps::clients::ConnectionOptions connection_options =
      ps::clients::ConnectionOptionsFromFlags();
  std::string http_host;
  int http_port = 0;
  if (api == "http") {
    if (rate > 0 || cancel_fraction > 0 || !absl::GetFlag(FLAGS_scenario).empty() ||
        absl::GetFlag(FLAGS_timeout) > absl::ZeroDuration()) {
      return Usage(
          "--api http takes --concurrency, not --rate, --cancel_fraction, --scenario "
          "or --timeout");
    }
    if (connection_options.tls || !connection_options.tls_ca.empty()) {
      return Usage("--api http is plaintext only");
    }
    const std::string target = absl::GetFlag(FLAGS_http_target);
    const size_t colon = target.rfind(':');
    if (colon == std::string::npos || !absl::SimpleAtoi(target.substr(colon + 1), &http_port) ||
        http_port <= 0 || http_port > 65535) {
      return Usage("--http_target: host:port, got " + target);
    }
    http_host = target.substr(0, colon);
  }

  absl::StatusOr<ps::clients::Connection> connection = ps::clients::Connect(connection_options);
  if (!connection.ok()) return Usage(std::string(connection.status().message()));
  std::shared_ptr<grpc::Channel> channel = connection->channel;
  auto stub = pb::GenerationService::NewStub(channel);
  if (api == "grpc" &&
      !channel->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(10)))) {
    std::cerr << "polysketch-loadgen: cannot connect to " << absl::GetFlag(FLAGS_target) << "\n";
    return 1;
  }
  if (const std::string scenario = absl::GetFlag(FLAGS_scenario); !scenario.empty()) {
    if (scenario != "chat" && scenario != "shared_prefix") {
      return Usage("--scenario: chat or shared_prefix, got " + scenario);
    }
    ps::loadgen::ScenarioOptions options;
    options.name = scenario;
    options.turns = absl::GetFlag(FLAGS_turns);
    options.turn_bytes = absl::GetFlag(FLAGS_turn_bytes);
    options.sessions = absl::GetFlag(FLAGS_sessions);
    options.requests = absl::GetFlag(FLAGS_requests);
    options.system_bytes = absl::GetFlag(FLAGS_system_bytes);
    options.user_bytes = absl::GetFlag(FLAGS_user_bytes);
    options.max_new_tokens = max_new_tokens;
    options.timeout = absl::GetFlag(FLAGS_timeout);
    options.seed = absl::GetFlag(FLAGS_seed);
    options.json = absl::GetFlag(FLAGS_json);
    if (options.turns < 1 || options.turn_bytes < 1 || options.requests < 1 ||
        options.system_bytes < 0 || options.user_bytes < 1) {
      return Usage("--turns, --turn_bytes, --requests, --user_bytes must be >= 1");
    }
    options.authorization = connection->authorization;
    return ps::loadgen::RunScenario(*stub, options);
  }

  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::bernoulli_distribution pick_cancel(cancel_fraction);
  std::uniform_int_distribution<int> pick_cancel_after(0, std::max(0, max_new_tokens - 1));
  std::exponential_distribution<double> gap(rate > 0 ? rate : 1.0);
  Collector collector;
  const Clock::time_point begin = Clock::now();
  const Clock::time_point end_by =
      duration > absl::ZeroDuration()
          ? begin + std::chrono::duration_cast<Clock::duration>(absl::ToChronoSeconds(duration))
          : Clock::time_point::max();
  Clock::time_point next_arrival = begin;
  int sent = 0;
  uint64_t id_counter = 0;
  if (api == "http") {
    sent =
        RunHttp(http_host, http_port, connection->authorization, concurrency, num_requests, end_by,
                prompts, max_new_tokens, temperature_text, absl::GetFlag(FLAGS_seed), &collector);
  }
  while (api == "grpc" && (num_requests == 0 || sent < num_requests) && Clock::now() < end_by) {
    if (rate > 0) {
      next_arrival +=
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
      if (next_arrival >= end_by) break;
      std::this_thread::sleep_until(next_arrival);
    } else {
      collector.WaitBelow(concurrency, end_by);
      if (Clock::now() >= end_by) break;
    }
    pb::GenerateRequest request;
    request.set_request_id(absl::StrCat("loadgen-", absl::GetFlag(FLAGS_seed), "-", id_counter++));
    request.set_text(prompts.Next(rng));
    request.set_max_new_tokens(static_cast<uint32_t>(max_new_tokens));
    if (!temperature_text.empty()) request.mutable_sampling()->set_temperature(temperature);
    const bool cancel = pick_cancel(rng);
    const uint32_t cancel_after = static_cast<uint32_t>(pick_cancel_after(rng));
    new StreamCall(stub.get(), *connection, std::move(request), cancel, cancel_after,
                   absl::GetFlag(FLAGS_timeout), &collector);
    ++sent;
  }
  collector.WaitAll();
  const double wall = Seconds(Clock::now() - begin);

  // --- Report ---
  std::vector<Outcome> outcomes = collector.Take();
  std::map<std::string, int> errors;
  std::map<std::string, int> statuses;  // every final status, ours and the server's
  int expected = 0;                     // errors with a code of --expected_codes
  std::vector<double> ttft, itl, tpot, e2e;
  int ok = 0, cancelled = 0;
  uint64_t tokens = 0, prompt_tokens = 0;
  for (Outcome& o : outcomes) {
    ++statuses[CodeName(o.code)];
    tokens += o.tokens;
    prompt_tokens += o.prompt_tokens;
    if (o.got_first_token) ttft.push_back(o.ttft_seconds);
    itl.insert(itl.end(), o.itl_seconds.begin(), o.itl_seconds.end());
    if (o.code == grpc::StatusCode::OK && o.tpot_seconds >= 0) tpot.push_back(o.tpot_seconds);
    if (o.code == grpc::StatusCode::OK) {
      ++ok;
      e2e.push_back(o.e2e_seconds);
    } else if (o.cancelled_by_us && o.code == grpc::StatusCode::CANCELLED) {
      ++cancelled;
    } else {
      ++errors[CodeName(o.code)];
      if (expected_codes.contains(CodeName(o.code))) ++expected;
    }
  }
  int num_errors = 0;
  for (const auto& [code, count] : errors) num_errors += count;
  const Distribution ttft_d = Summarize(std::move(ttft));
  const Distribution itl_d = Summarize(std::move(itl));
  const Distribution tpot_d = Summarize(std::move(tpot));
  const Distribution e2e_d = Summarize(std::move(e2e));
  const double rps = wall > 0 ? ok / wall : 0;
  const double tps = wall > 0 ? static_cast<double>(tokens) / wall : 0;

  std::string mode = rate > 0 ? absl::StrFormat("rate %.3g/s (Poisson)", rate)
                              : absl::StrFormat("concurrency %d", concurrency);
  if (api == "http") mode += ", HTTP API (inter-token latency: between events)";
  const std::string prompt_text =
      prompt_bytes_max > 0
          ? absl::StrFormat("%d..%d (log-uniform)", prompt_bytes_min, prompt_bytes_max)
          : absl::StrCat(absl::GetFlag(FLAGS_prompt_bytes));
  std::string text = absl::StrFormat(
      "polysketch-loadgen: %s, %d requests, prompt %s bytes, max_new_tokens %d\n"
      "requests: sent %d, ok %d, cancelled (by --cancel_fraction) %d, errors %d (%d of "
      "--expected_codes)\n"
      "wall %.3f s, %.2f requests/s, %.1f generated tokens/s, %d generated tokens, %d prompt "
      "tokens\n",
      mode, sent, prompt_text, max_new_tokens, sent, ok, cancelled, num_errors, expected, wall, rps,
      tps, tokens, prompt_tokens);
  text += DistributionText("time to first token", ttft_d);
  text += DistributionText("inter-token latency", itl_d);
  text += DistributionText("time per output token", tpot_d);
  text += DistributionText("end-to-end latency", e2e_d);
  for (const auto& [code, count] : errors) text += absl::StrFormat("error %s: %d\n", code, count);
  text += "final statuses:";
  for (const auto& [code, count] : statuses) text += absl::StrFormat(" %s %d", code, count);
  text += "\n";
  std::cerr << text;
  if (absl::GetFlag(FLAGS_json)) {
    std::string errors_json, statuses_json;
    for (const auto& [code, count] : errors) {
      absl::StrAppend(&errors_json, errors_json.empty() ? "" : ", ", "\"", code, "\": ", count);
    }
    for (const auto& [code, count] : statuses) {
      absl::StrAppend(&statuses_json, statuses_json.empty() ? "" : ", ", "\"", code, "\": ", count);
    }
    std::cout << absl::StrFormat(
        "{\"api\": \"%s\", \"mode\": \"%s\", \"concurrency\": %d, \"rate\": %.6f, "
        "\"prompt_bytes\": %d, "
        "\"prompt_bytes_min\": %d, \"prompt_bytes_max\": %d, "
        "\"max_new_tokens\": %d, \"sent\": %d, \"ok\": %d, \"cancelled\": %d, \"errors\": %d, "
        "\"expected_errors\": %d, \"errors_by_code\": {%s}, \"statuses_by_code\": {%s}, "
        "\"wall_seconds\": %.6f, \"requests_per_second\": %.6f, "
        "\"generated_tokens\": %d, \"prompt_tokens\": %d, \"generated_tokens_per_second\": %.6f, "
        "\"ttft_seconds\": %s, \"itl_seconds\": %s, \"tpot_seconds\": %s, \"e2e_seconds\": %s}\n",
        api, rate > 0 ? "rate" : "concurrency", concurrency, rate,
        absl::GetFlag(FLAGS_prompt_bytes), prompt_bytes_min, prompt_bytes_max, max_new_tokens, sent,
        ok, cancelled, num_errors, expected, errors_json, statuses_json, wall, rps, tokens,
        prompt_tokens, tps, DistributionJson(ttft_d), DistributionJson(itl_d),
        DistributionJson(tpot_d), DistributionJson(e2e_d));
  }
  return num_errors > expected ? 1 : 0;
}
