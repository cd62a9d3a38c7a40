#include "clients/loadgen/scenarios.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <grpcpp/grpcpp.h>

namespace ps::loadgen {
namespace {

namespace pb = ::polysketch::v1;
using Clock = std::chrono::steady_clock;

// Text of about `bytes` bytes: words drawn from a fixed list, so the byte tokenizer sees English-
// like text and every call gives different text.
std::string Words(std::mt19937_64& rng, int bytes) {
  static const char* const kWords[] = {"the",  "river", "light",   "stone", "and",   "of",
                                       "city", "north", "morning", "wind",  "field", "house",
                                       "was",  "under", "silver",  "road",  "in",    "a"};
  std::uniform_int_distribution<size_t> pick(0, std::size(kWords) - 1);
  std::string text;
  while (static_cast<int>(text.size()) < bytes) {
    if (!text.empty()) text += ' ';
    text += kWords[pick(rng)];
  }
  text.resize(static_cast<size_t>(bytes));
  return text;
}

struct Result {
  bool ok = false;
  std::string error;
  double ttft_seconds = 0;
  std::string text;
  uint32_t prompt_tokens = 0;
  uint32_t cached_tokens = 0;
};

Result Stream(pb::GenerationService::Stub& stub, const std::string& prompt,
              const std::string& session, const ScenarioOptions& options) {
  pb::GenerateRequest request;
  request.set_text(prompt);
  request.set_max_new_tokens(static_cast<uint32_t>(options.max_new_tokens));
  request.mutable_sampling()->set_temperature(0);
  request.set_session_id(session);
  grpc::ClientContext context;
  if (!options.authorization.empty()) context.AddMetadata("authorization", options.authorization);
  if (options.timeout > absl::ZeroDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + options.timeout));
  }
  Result result;
  const Clock::time_point start = Clock::now();
  std::unique_ptr<grpc::ClientReader<pb::GenerateStreamResponse>> reader =
      stub.GenerateStream(&context, request);
  pb::GenerateStreamResponse message;
  bool first = true;
  while (reader->Read(&message)) {
    if (first && message.tokens_size() > 0) {
      result.ttft_seconds = std::chrono::duration<double>(Clock::now() - start).count();
      first = false;
    }
    result.text += message.text();
    if (message.has_final()) {
      result.prompt_tokens = message.final().prompt_tokens();
      result.cached_tokens = message.final().cached_tokens();
    }
  }
  const grpc::Status status = reader->Finish();
  result.ok = status.ok();
  if (!status.ok()) {
    result.error = absl::StrCat("code ", status.error_code(), ": ", status.error_message());
  }
  return result;
}

double Mean(const std::vector<double>& v) {
  return v.empty() ? 0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

int Report(const ScenarioOptions& options, const std::vector<Result>& results,
           const std::string& what) {
  std::vector<double> ttft;
  int failed = 0;
  std::printf("%s\n%6s %12s %14s %14s\n", what.c_str(), "#", "ttft_ms", "prompt_tokens",
              "cached_tokens");
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    if (!r.ok) {
      ++failed;
      std::printf("%6zu  failed: %s\n", i + 1, r.error.c_str());
      continue;
    }
    ttft.push_back(r.ttft_seconds);
    std::printf("%6zu %12.1f %14u %14u\n", i + 1, r.ttft_seconds * 1e3, r.prompt_tokens,
                r.cached_tokens);
  }
  std::vector<double> sorted = ttft;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted.empty() ? 0 : sorted[sorted.size() / 2];
  std::printf("ttft mean %.1f ms, median %.1f ms, total %.2f s over %zu requests, %d failed\n",
              Mean(ttft) * 1e3, median * 1e3, std::accumulate(ttft.begin(), ttft.end(), 0.0),
              results.size(), failed);
  if (options.json) {
    std::vector<std::string> per;
    for (const Result& r : results) {
      per.push_back(absl::StrFormat(
          "{\"ok\":%s,\"ttft_s\":%.6f,\"prompt_tokens\":%u,"
          "\"cached_tokens\":%u}",
          r.ok ? "true" : "false", r.ttft_seconds, r.prompt_tokens, r.cached_tokens));
    }
    std::printf(
        "{\"scenario\":\"%s\",\"sessions\":%s,\"ttft_mean_s\":%.6f,"
        "\"ttft_median_s\":%.6f,\"failed\":%d,\"requests\":[%s]}\n",
        options.name.c_str(), options.sessions ? "true" : "false", Mean(ttft), median, failed,
        absl::StrJoin(per, ",").c_str());
  }
  return failed == 0 ? 0 : 1;
}

int RunChat(pb::GenerationService::Stub& stub, const ScenarioOptions& options) {
  std::mt19937_64 rng(options.seed);
  std::string session;
  if (options.sessions) {
    grpc::ClientContext context;
    if (!options.authorization.empty()) context.AddMetadata("authorization", options.authorization);
    pb::OpenSessionResponse opened;
    const grpc::Status status = stub.OpenSession(&context, {}, &opened);
    if (!status.ok()) {
      std::fprintf(stderr, "polysketch-loadgen: OpenSession: %s\n", status.error_message().c_str());
      return 1;
    }
    session = opened.session_id();
  }
  std::string conversation;  // everything so far, for the resending client
  std::vector<Result> results;
  for (int turn = 0; turn < options.turns; ++turn) {
    const std::string user = Words(rng, options.turn_bytes);
    conversation += user;
    Result r = Stream(stub, options.sessions ? user : conversation, session, options);
    conversation += r.text;
    results.push_back(std::move(r));
    if (!results.back().ok) break;
  }
  if (options.sessions) {
    grpc::ClientContext context;
    if (!options.authorization.empty()) context.AddMetadata("authorization", options.authorization);
    pb::CloseSessionRequest close;
    close.set_session_id(session);
    pb::CloseSessionResponse closed;
    stub.CloseSession(&context, close, &closed).ok();  // best effort; it expires otherwise
  }
  return Report(options, results,
                absl::StrCat("chat: ", options.turns, " turns of ", options.turn_bytes, " bytes, ",
                             options.sessions ? "session" : "resending the history"));
}

int RunSharedPrefix(pb::GenerationService::Stub& stub, const ScenarioOptions& options) {
  std::mt19937_64 rng(options.seed);
  const std::string system = Words(rng, options.system_bytes);
  std::vector<Result> results;
  for (int i = 0; i < options.requests; ++i) {
    results.push_back(Stream(stub, system + Words(rng, options.user_bytes), "", options));
  }
  return Report(
      options, results,
      absl::StrCat("shared_prefix: ", options.requests, " requests, a ", options.system_bytes,
                   "-byte system prompt + ", options.user_bytes, " bytes each"));
}

}  // namespace

int RunScenario(pb::GenerationService::Stub& stub, const ScenarioOptions& options) {
  if (options.name == "chat") return RunChat(stub, options);
  return RunSharedPrefix(stub, options);
}

}  // namespace ps::loadgen
