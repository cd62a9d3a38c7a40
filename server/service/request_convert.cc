// GenerateRequest validation and conversion. Every check names the field path of the proto, so a
// client can find its mistake from the message alone; the engine's own Validate calls run last
// as a backstop (their messages get the field's path prefixed).
#include "server/service/request_convert.h"

#include <cmath>
#include <mutex>
#include <random>
#include <utility>

#include <absl/strings/str_cat.h>

#include "base/status_macros.h"
#include "server/engine/model_io/tokenizer.h"

namespace ps::service {
namespace {

namespace v1 = ::polysketch::v1;

absl::Status Invalid(absl::string_view field, absl::string_view rule, absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", rule, ", got ", got));
}

// "<field>: must be in [lo, hi], got v" (open ends as the brackets say); NaN fails every range.
absl::Status CheckRange(absl::string_view field, double value, double lo, double hi,
                        bool lo_open = false) {
  const bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) && value <= hi;
  if (ok) return absl::OkStatus();
  return Invalid(field, absl::StrCat("must be in ", lo_open ? "(" : "[", lo, ", ", hi, "]"),
                 absl::StrCat(value));
}

uint64_t DefaultRandomSeed() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mu);
  return rng();
}

}  // namespace

absl::Status ValidateId(absl::string_view field, absl::string_view id) {
  if (id.size() > kMaxRequestIdBytes) {
    return Invalid(field, absl::StrCat("must be at most ", kMaxRequestIdBytes, " bytes"),
                   absl::StrCat(id.size(), " bytes"));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    if (c < 0x20 || c > 0x7E) {
      return Invalid(field, "must be printable ASCII (0x20..0x7E)",
                     absl::StrCat("byte ", static_cast<int>(c), " at ", i));
    }
  }
  return absl::OkStatus();
}

namespace {

absl::StatusOr<std::vector<int32_t>> ConvertPrompt(const v1::GenerateRequest& proto,
                                                   const RequestLimits& limits) {
  std::vector<int32_t> prompt;
  switch (proto.prompt_case()) {
    case v1::GenerateRequest::kText: {
      const int64_t bad = FirstInvalidUtf8Byte(proto.text());
      if (bad >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("prompt.text: not valid UTF-8 at byte ", bad));
      }
      prompt.reserve(proto.text().size());
      for (const char c : proto.text()) prompt.push_back(static_cast<unsigned char>(c));
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = proto.token_ids().ids();
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= limits.vocab_size) {
          return Invalid(absl::StrCat("prompt.token_ids[", i, "]"),
                         absl::StrCat("must be in [0, ", limits.vocab_size, ")"),
                         absl::StrCat(ids[i]));
        }
      }
      prompt.assign(ids.begin(), ids.end());
      break;
    }
    default:
      return absl::InvalidArgumentError("prompt: give text or token_ids");
  }
  if (prompt.empty()) return absl::InvalidArgumentError("prompt: must not be empty");
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n > limits.max_prompt_tokens || n > limits.max_context) {
    return Invalid("prompt",
                   absl::StrCat("must have at most ", limits.max_prompt_tokens,
                                " tokens (max_prompt_tokens) and at most ", limits.max_context,
                                " (the context limit)"),
                   absl::StrCat(n, " tokens"));
  }
  return prompt;
}

absl::StatusOr<engine::SamplingParams> ConvertSampling(const v1::GenerateRequest& proto,
                                                       const RequestLimits& limits,
                                                       const std::function<uint64_t()>& random_seed,
                                                       bool* seed_picked) {
  const v1::SamplingParams& s = proto.sampling();
  engine::SamplingParams p;
  p.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  p.top_k = s.top_k();
  p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  p.min_p = s.min_p();
  p.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
  p.presence_penalty = s.presence_penalty();
  p.frequency_penalty = s.frequency_penalty();
  PS_RETURN_IF_ERROR(CheckRange("sampling.temperature", p.temperature, 0, 100));
  PS_RETURN_IF_ERROR(
      CheckRange("sampling.top_k", p.top_k, 0, static_cast<double>(limits.vocab_size)));
  PS_RETURN_IF_ERROR(CheckRange("sampling.top_p", p.top_p, 0, 1, /*lo_open=*/true));
  PS_RETURN_IF_ERROR(CheckRange("sampling.min_p", p.min_p, 0, 1));
  PS_RETURN_IF_ERROR(
      CheckRange("sampling.repetition_penalty", p.repetition_penalty, 0, 10, /*lo_open=*/true));
  PS_RETURN_IF_ERROR(CheckRange("sampling.presence_penalty", p.presence_penalty, -2, 2));
  PS_RETURN_IF_ERROR(CheckRange("sampling.frequency_penalty", p.frequency_penalty, -2, 2));
  if (proto.top_logprobs() > static_cast<uint32_t>(engine::kMaxTopLogprobs)) {
    return Invalid("top_logprobs", absl::StrCat("must be in [0, ", engine::kMaxTopLogprobs, "]"),
                   absl::StrCat(proto.top_logprobs()));
  }
  if (proto.top_logprobs() > 0 && !proto.logprobs()) {
    return Invalid("top_logprobs", "must be 0 unless logprobs is set",
                   absl::StrCat(proto.top_logprobs()));
  }
  p.logprobs = proto.logprobs();
  p.top_logprobs = static_cast<int32_t>(proto.top_logprobs());
  *seed_picked = !s.has_seed();
  p.seed = s.has_seed() ? s.seed() : (random_seed ? random_seed() : DefaultRandomSeed());
  if (absl::Status status = p.Validate(limits.vocab_size); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.", status.message()));
  }
  return p;
}

absl::StatusOr<engine::StopConditions> ConvertStops(const v1::GenerateRequest& proto,
                                                    const RequestLimits& limits) {
  engine::StopConditions stops;
  // Unset: the default. An explicit 0 generates nothing (pure scoring).
  const int64_t max_new = proto.has_max_new_tokens() ? static_cast<int64_t>(proto.max_new_tokens())
                                                     : kDefaultMaxNewTokens;
  if (max_new > limits.max_new_tokens_limit) {
    return Invalid("max_new_tokens",
                   absl::StrCat("must be in [0, ", limits.max_new_tokens_limit,
                                "] (unset: default ", kDefaultMaxNewTokens, ")"),
                   absl::StrCat(proto.max_new_tokens()));
  }
  if (static_cast<int64_t>(proto.min_new_tokens()) > max_new) {
    return Invalid("min_new_tokens", absl::StrCat("must be in [0, max_new_tokens = ", max_new, "]"),
                   absl::StrCat(proto.min_new_tokens()));
  }
  stops.max_new_tokens = max_new;
  stops.min_new_tokens = proto.min_new_tokens();
  const v1::StopParams& s = proto.stop();
  if (s.stop_strings_size() > engine::kMaxStopStrings) {
    return Invalid("stop.stop_strings",
                   absl::StrCat("must have at most ", engine::kMaxStopStrings, " entries"),
                   absl::StrCat(s.stop_strings_size()));
  }
  for (int i = 0; i < s.stop_strings_size(); ++i) {
    const std::string& str = s.stop_strings(i);
    const std::string field = absl::StrCat("stop.stop_strings[", i, "]");
    if (str.empty() || str.size() > static_cast<size_t>(engine::kMaxStopStringBytes)) {
      return Invalid(field, absl::StrCat("must have 1..", engine::kMaxStopStringBytes, " bytes"),
                     absl::StrCat(str.size(), " bytes"));
    }
    const int64_t bad = FirstInvalidUtf8Byte(str);
    if (bad >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": not valid UTF-8 at byte ", bad));
    }
    stops.stop_strings.push_back(str);
  }
  if (s.stop_token_ids_size() > engine::kMaxStopTokenIds) {
    return Invalid("stop.stop_token_ids",
                   absl::StrCat("must have at most ", engine::kMaxStopTokenIds, " entries"),
                   absl::StrCat(s.stop_token_ids_size()));
  }
  for (int i = 0; i < s.stop_token_ids_size(); ++i) {
    const int32_t id = s.stop_token_ids(i);
    if (id < 0 || id >= limits.vocab_size) {
      return Invalid(absl::StrCat("stop.stop_token_ids[", i, "]"),
                     absl::StrCat("must be in [0, ", limits.vocab_size, ")"), absl::StrCat(id));
    }
    stops.stop_token_ids.push_back(id);
  }
  stops.include_stop_string = s.include_stop_string();
  // ignore_eos: the byte-level models have no EOS token; accepted and without effect.
  if (absl::Status status = stops.Validate(limits.vocab_size); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("stop.", status.message()));
  }
  return stops;
}

absl::Status ConvertPromptLogprobs(const v1::GenerateRequest& proto,
                                   engine::EngineRequest* request) {
  if (proto.prompt_top_logprobs() > static_cast<uint32_t>(engine::kMaxTopLogprobs)) {
    return Invalid("prompt_top_logprobs",
                   absl::StrCat("must be in [0, ", engine::kMaxTopLogprobs, "]"),
                   absl::StrCat(proto.prompt_top_logprobs()));
  }
  if (proto.prompt_top_logprobs() > 0 && !proto.prompt_logprobs()) {
    return Invalid("prompt_top_logprobs", "must be 0 unless prompt_logprobs is set",
                   absl::StrCat(proto.prompt_top_logprobs()));
  }
  if (proto.prompt_logprobs() && !proto.session_id().empty()) {
    return absl::InvalidArgumentError(
        "prompt_logprobs: not available with session_id: a session turn's earlier tokens are "
        "not re-scored (send the whole text without a session to score it)");
  }
  request->prompt_logprobs = proto.prompt_logprobs();
  request->prompt_top_logprobs = static_cast<int32_t>(proto.prompt_top_logprobs());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ConvertedRequest> ConvertGenerateRequest(
    const v1::GenerateRequest& proto, const RequestLimits& limits,
    const std::function<uint64_t()>& random_seed) {
  ConvertedRequest out;
  PS_RETURN_IF_ERROR(ValidateId("request_id", proto.request_id()));
  out.request.id = proto.request_id();
  PS_RETURN_IF_ERROR(ValidateId("session_id", proto.session_id()));
  out.request.session_id = proto.session_id();
  PS_ASSIGN_OR_RETURN(out.request.prompt, ConvertPrompt(proto, limits));
  PS_ASSIGN_OR_RETURN(out.request.stops, ConvertStops(proto, limits));
  PS_ASSIGN_OR_RETURN(out.request.sampling,
                      ConvertSampling(proto, limits, random_seed, &out.seed_picked));
  PS_RETURN_IF_ERROR(ConvertPromptLogprobs(proto, &out.request));
  if (proto.cache_salt().size() > engine::kMaxCacheSaltBytes) {
    return Invalid("cache_salt",
                   absl::StrCat("must be at most ", engine::kMaxCacheSaltBytes, " bytes"),
                   absl::StrCat(proto.cache_salt().size(), " bytes"));
  }
  out.request.prefix_cache_salt = proto.cache_salt();
  if (proto.time_limit_ms() > 0) out.time_limit = absl::Milliseconds(proto.time_limit_ms());
  return out;
}

v1::FinishReason ToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStopToken:
      return v1::FINISH_REASON_STOP_TOKEN;
    case engine::FinishReason::kStopString:
      return v1::FINISH_REASON_STOP_STRING;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kDeadline:
      return v1::FINISH_REASON_DEADLINE;
    case engine::FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void FillFinalInfo(const engine::FinalResult& result, v1::FinalInfo* info) {
  info->set_finish_reason(ToProto(result.reason));
  info->set_prompt_tokens(static_cast<uint32_t>(result.prompt_tokens));
  info->set_generated_tokens(static_cast<uint32_t>(result.generated_tokens));
  info->set_cached_tokens(static_cast<uint32_t>(result.cached_tokens));
  info->set_seed(result.seed);
  v1::Timings* t = info->mutable_timings();
  t->set_queue_seconds(absl::ToDoubleSeconds(result.timings.queue));
  t->set_prefill_seconds(absl::ToDoubleSeconds(result.timings.prefill));
  t->set_first_token_seconds(absl::ToDoubleSeconds(result.timings.first_token));
  t->set_total_seconds(absl::ToDoubleSeconds(result.timings.total));
  if (result.reason == engine::FinishReason::kError) {
    info->set_error_message(std::string(result.error.message()));
  }
}

v1::ModelInfo BuildModelInfo(const engine::ModelConfig& config, const ModelInfoExtras& extras) {
  v1::ModelInfo info;
  info.set_name(extras.name);
  info.set_architecture("polysketchformer");
  for (const engine::AttentionConfig& layer : config.layers) {
    info.add_attention_kinds(std::string(engine::AttentionKindName(layer.kind)));
  }
  info.set_vocab_size(static_cast<uint32_t>(config.vocab_size));
  info.set_d_model(static_cast<uint32_t>(config.d_model));
  info.set_n_layers(static_cast<uint32_t>(config.n_layers));
  info.set_n_heads(static_cast<uint32_t>(config.n_heads));
  info.set_d_ff(static_cast<uint32_t>(config.d_ff));
  info.set_max_seq_len(static_cast<uint32_t>(config.max_seq_len));
  info.set_state_bytes_per_request(static_cast<uint64_t>(extras.state_bytes_per_request));
  info.set_device(extras.device);
  info.set_tokenizer("bytes");
  v1::Limits* limits = info.mutable_limits();
  limits->set_max_context(static_cast<uint64_t>(extras.limits.max_context));
  limits->set_max_prompt_tokens(static_cast<uint64_t>(extras.limits.max_prompt_tokens));
  limits->set_max_new_tokens(static_cast<uint32_t>(extras.limits.max_new_tokens_limit));
  limits->set_state_slots(static_cast<uint32_t>(extras.state_slots));
  limits->set_max_waiting(static_cast<uint32_t>(extras.max_waiting));
  limits->set_max_waiting_tokens(static_cast<uint64_t>(extras.max_waiting_tokens));
  return info;
}

}  // namespace ps::service
