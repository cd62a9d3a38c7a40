// Fuzz target: a GenerateRequest as it arrives on the wire (raw protobuf bytes), through the
// service's validation and conversion (ConvertGenerateRequest), and then into the engine objects
// the request would get (Sampler, StopChecker) for a few sampling steps. A refused request must be
// InvalidArgument whose message starts with the field path (the API's promise); an accepted one
// must be inside every limit, and its parameters must never make the sampler fail or pick a
// token outside the vocabulary or one whose logit is -inf.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <absl/strings/match.h>
#include <absl/strings/string_view.h>

#include "fuzz/fuzz_check.h"
#include "polysketch/v1/generation.pb.h"
#include "server/engine/model_io/tokenizer.h"
#include "server/engine/serving/sampler.h"
#include "server/engine/serving/stop_checker.h"
#include "server/service/request_convert.h"

namespace {

constexpr uint64_t kPickedSeed = 0x5eed;

// Field paths that start every validation message (request_convert.h).
constexpr absl::string_view kFieldPrefixes[] = {"request_id: ",      "prompt",
                                                "sampling.",         "stop.",
                                                "max_new_tokens: ",  "min_new_tokens: ",
                                                "top_logprobs: ",    "session_id: ",
                                                "prompt_logprobs: ", "prompt_top_logprobs: "};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  polysketch::v1::GenerateRequest proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return 0;

  ps::service::RequestLimits limits;
  limits.vocab_size = 256;
  limits.max_context = 4096;
  limits.max_prompt_tokens = 2048;
  limits.max_new_tokens_limit = 1024;
  absl::StatusOr<ps::service::ConvertedRequest> converted =
      ps::service::ConvertGenerateRequest(proto, limits, [] { return kPickedSeed; });
  if (!converted.ok()) {
    const absl::Status& s = converted.status();
    PS_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument, "code %d",
                  static_cast<int>(s.code()));
    bool named = false;
    for (absl::string_view prefix : kFieldPrefixes) named |= absl::StartsWith(s.message(), prefix);
    PS_FUZZ_CHECK(named, "message names no field: %s", std::string(s.message()).c_str());
    PS_FUZZ_CHECK(ps::engine::IsValidUtf8(s.message()), "message is not valid UTF-8");
    return 0;
  }

  const ps::engine::EngineRequest& r = converted->request;
  PS_FUZZ_CHECK(r.id == proto.request_id(), "request_id changed");
  PS_FUZZ_CHECK(r.id.size() <= ps::service::kMaxRequestIdBytes, "request_id too long");
  for (char c : r.id) PS_FUZZ_CHECK(c >= 0x20 && c <= 0x7E, "request_id byte %d", c);
  PS_FUZZ_CHECK(!r.prompt.empty(), "empty prompt accepted");
  PS_FUZZ_CHECK(static_cast<int64_t>(r.prompt.size()) <= limits.max_prompt_tokens, "prompt size");
  for (int32_t id : r.prompt) PS_FUZZ_CHECK(id >= 0 && id < limits.vocab_size, "prompt id %d", id);
  if (proto.has_text()) {
    PS_FUZZ_CHECK(ps::engine::IsValidUtf8(proto.text()), "invalid UTF-8 text accepted");
    PS_FUZZ_CHECK(r.prompt.size() == proto.text().size(), "text prompt is not one id per byte");
  }
  PS_FUZZ_CHECK(
      r.stops.max_new_tokens >= 0 && r.stops.max_new_tokens <= limits.max_new_tokens_limit,
      "max_new_tokens %lld", static_cast<long long>(r.stops.max_new_tokens));
  PS_FUZZ_CHECK(r.stops.max_new_tokens == (proto.has_max_new_tokens()
                                               ? static_cast<int64_t>(proto.max_new_tokens())
                                               : ps::service::kDefaultMaxNewTokens),
                "max_new_tokens not the request's (or the default when unset)");
  PS_FUZZ_CHECK(r.prompt_logprobs == proto.prompt_logprobs(), "prompt_logprobs changed");
  PS_FUZZ_CHECK(r.prompt_top_logprobs >= 0 && r.prompt_top_logprobs <= ps::engine::kMaxTopLogprobs,
                "prompt_top_logprobs %d", r.prompt_top_logprobs);
  PS_FUZZ_CHECK(r.prompt_top_logprobs == 0 || r.prompt_logprobs,
                "prompt_top_logprobs without prompt_logprobs accepted");
  PS_FUZZ_CHECK(!r.prompt_logprobs || r.session_id.empty(), "prompt_logprobs with a session");
  PS_FUZZ_CHECK(r.stops.Validate(limits.vocab_size).ok(), "stops fail the engine's Validate");
  PS_FUZZ_CHECK(r.sampling.Validate(limits.vocab_size).ok(),
                "sampling fails the engine's Validate");
  PS_FUZZ_CHECK(converted->seed_picked == !proto.sampling().has_seed(), "seed_picked");
  PS_FUZZ_CHECK(
      r.sampling.seed == (proto.sampling().has_seed() ? proto.sampling().seed() : kPickedSeed),
      "seed");

  absl::StatusOr<ps::engine::StopChecker> stops =
      ps::engine::StopChecker::Create(r.stops, limits.vocab_size);
  PS_FUZZ_CHECK(stops.ok(), "StopChecker refused accepted stops");
  absl::StatusOr<ps::engine::Sampler> sampler =
      ps::engine::Sampler::Create(r.sampling, limits.vocab_size, r.prompt);
  PS_FUZZ_CHECK(sampler.ok(), "Sampler refused accepted parameters: %s",
                std::string(sampler.status().message()).c_str());

  // Logits a real model could produce: a spread of finite values, a tie, and masked (-inf) ids.
  std::vector<float> logits(static_cast<size_t>(limits.vocab_size));
  for (size_t i = 0; i < logits.size(); ++i) {
    logits[i] = static_cast<float>((i * 37) % 101) * 0.25f - 12.0f;
  }
  logits[7] = logits[8];
  for (size_t i = 200; i < logits.size(); ++i) logits[i] = -std::numeric_limits<float>::infinity();
  // The prompt log-probabilities' scoring (the scheduler's) on the same logits.
  absl::StatusOr<double> log_normalizer = ps::engine::LogNormalizer(logits);
  PS_FUZZ_CHECK(log_normalizer.ok(), "LogNormalizer failed on finite logits");
  std::vector<int32_t> scratch;
  const std::vector<ps::engine::TokenLogprob> top =
      ps::engine::TopLogprobs(logits, *log_normalizer, r.prompt_top_logprobs, &scratch);
  PS_FUZZ_CHECK(top.size() == static_cast<size_t>(r.prompt_top_logprobs), "%zu prompt top",
                top.size());
  for (size_t i = 0; i < top.size(); ++i) {
    PS_FUZZ_CHECK(top[i].token_id >= 0 && top[i].token_id < 200, "prompt top id %d",
                  top[i].token_id);
    PS_FUZZ_CHECK(i == 0 || top[i - 1].logprob >= top[i].logprob, "prompt top not sorted");
  }
  for (int step = 0; step < 4; ++step) {
    absl::StatusOr<ps::engine::SampleResult> s = sampler->Sample(logits);
    PS_FUZZ_CHECK(s.ok(), "Sample failed on finite logits: %s",
                  std::string(s.status().message()).c_str());
    PS_FUZZ_CHECK(s->token_id >= 0 && s->token_id < 200, "sampled token %d (masked or outside)",
                  s->token_id);
    if (r.sampling.logprobs) {
      PS_FUZZ_CHECK(std::isfinite(s->logprob) && s->logprob <= 0.0f, "logprob %g",
                    static_cast<double>(s->logprob));
    }
    PS_FUZZ_CHECK(s->top_logprobs.size() ==
                      static_cast<size_t>(r.sampling.logprobs ? r.sampling.top_logprobs : 0),
                  "%zu top logprobs", s->top_logprobs.size());
    for (size_t i = 1; i < s->top_logprobs.size(); ++i) {
      PS_FUZZ_CHECK(s->top_logprobs[i - 1].logprob >= s->top_logprobs[i].logprob,
                    "top logprobs not sorted");
    }
    PS_FUZZ_CHECK(sampler->Accept(s->token_id).ok(), "Accept");
    // Shift the logits so later steps see another distribution.
    for (size_t i = 0; i < 200; ++i) logits[i] = logits[(i + 13) % 200] + 0.5f;
  }
  return 0;
}
