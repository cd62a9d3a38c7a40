// Fuzz target: the body of an OpenAI-compatible request (POST /v1/completions and
// /v1/chat/completions) as it arrives over HTTP, through the JSON parser (ParseApiRequest) and
// then the gRPC side's validation (ConvertGenerateRequest, its messages renamed), as the server
// does. A refused body must be InvalidArgument whose message starts with a field of the HTTP
// request (never a proto path such as "sampling.top_p" or "max_new_tokens") and is valid UTF-8;
// an accepted one must carry what the HTTP fields promise. Both endpoints see every input.
#include <cstddef>
#include <cstdint>
#include <string>

#include <absl/strings/match.h>
#include <absl/strings/string_view.h>

#include "fuzz/fuzz_check.h"
#include "server/engine/model_io/tokenizer.h"
#include "server/http/openai_request.h"
#include "server/service/request_convert.h"

namespace {

// The request fields an error message may start with (openai_request.h).
constexpr absl::string_view kFieldPrefixes[] = {"body: ",
                                                "prompt",
                                                "messages",
                                                "model: ",
                                                "temperature: ",
                                                "top_p: ",
                                                "top_k: ",
                                                "min_p: ",
                                                "presence_penalty: ",
                                                "frequency_penalty: ",
                                                "repetition_penalty: ",
                                                "seed: ",
                                                "max_tokens: ",
                                                "max_completion_tokens: ",
                                                "min_tokens: ",
                                                "stop",
                                                "include_stop_str",
                                                "ignore_eos: ",
                                                "logprobs: ",
                                                "top_logprobs: ",
                                                "echo: ",
                                                "stream: ",
                                                "stream_options: ",
                                                "user: ",
                                                "session_id: ",
                                                "n: ",
                                                "best_of: ",
                                                "suffix: ",
                                                "logit_bias: ",
                                                "tools: ",
                                                "functions: ",
                                                "tool_choice: ",
                                                "function_call: ",
                                                "response_format: "};
// The gRPC side's names, which must never reach an HTTP client.
constexpr absl::string_view kProtoPaths[] = {
    "sampling.",   "stop.stop_",       "max_new_tokens",      "min_new_tokens",
    "prompt.text", "prompt.token_ids", "prompt_top_logprobs", "prompt_logprobs"};

void CheckRefusal(const absl::Status& s) {
  PS_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument, "code %d: %s",
                static_cast<int>(s.code()), std::string(s.message()).c_str());
  bool named = false;
  for (absl::string_view prefix : kFieldPrefixes) named |= absl::StartsWith(s.message(), prefix);
  PS_FUZZ_CHECK(named, "message names no request field: %s", std::string(s.message()).c_str());
  for (absl::string_view path : kProtoPaths) {
    PS_FUZZ_CHECK(!absl::StartsWith(s.message(), path), "message names a proto field: %s",
                  std::string(s.message()).c_str());
  }
  PS_FUZZ_CHECK(ps::engine::IsValidUtf8(s.message()), "message is not valid UTF-8");
}

void Run(absl::string_view body, ps::http::ApiKind kind) {
  absl::StatusOr<ps::http::ApiRequest> parsed =
      ps::http::ParseApiRequest(body, kind, ps::http::DefaultChatTemplate());
  if (!parsed.ok()) return CheckRefusal(parsed.status());
  const ps::http::ApiRequest& r = *parsed;
  PS_FUZZ_CHECK(r.kind == kind, "kind changed");
  PS_FUZZ_CHECK(r.logprobs >= -1 && r.logprobs <= ps::http::kMaxApiTopLogprobs, "logprobs %d",
                r.logprobs);
  PS_FUZZ_CHECK(r.proto.logprobs() == (r.logprobs >= 0), "logprobs flag");
  PS_FUZZ_CHECK(r.proto.prompt_logprobs() == (r.echo && r.logprobs >= 0), "echo logprobs");
  PS_FUZZ_CHECK(!r.include_usage || r.stream, "include_usage without stream");
  PS_FUZZ_CHECK(kind == ps::http::ApiKind::kCompletion || !r.echo, "chat echo");
  if (kind == ps::http::ApiKind::kChat) {
    PS_FUZZ_CHECK(absl::EndsWith(r.proto.text(), ps::http::DefaultChatTemplate().generation_prompt),
                  "chat prompt without the generation prompt");
  } else {
    PS_FUZZ_CHECK(r.proto.has_max_new_tokens(), "completion without max_tokens");
  }

  ps::service::RequestLimits limits;
  limits.vocab_size = 256;
  limits.max_context = 4096;
  limits.max_prompt_tokens = 2048;
  limits.max_new_tokens_limit = 1024;
  absl::StatusOr<ps::service::ConvertedRequest> converted =
      ps::service::ConvertGenerateRequest(r.proto, limits, [] { return uint64_t{1}; });
  if (!converted.ok()) return CheckRefusal(ps::http::RenameProtoField(converted.status(), kind));
  PS_FUZZ_CHECK(!converted->request.prompt.empty(), "empty prompt accepted");
  PS_FUZZ_CHECK(converted->request.sampling.top_logprobs == std::max(r.logprobs, 0),
                "top_logprobs");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view body(reinterpret_cast<const char*>(data), size);
  Run(body, ps::http::ApiKind::kCompletion);
  Run(body, ps::http::ApiKind::kChat);
  return 0;
}
