// OpenAI response JSON (nlohmann::json, dumped with invalid UTF-8 replaced: the engine's text is
// valid UTF-8 already, so the replacement only guards the invariant).
#include "server/http/openai_response.h"

#include <utility>

#include <absl/strings/str_cat.h>
#include <nlohmann/json.hpp>

#include "server/engine/model_io/tokenizer.h"

namespace ps::http {
namespace {

using nlohmann::json;

std::string Dump(const json& value) {
  return value.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
}

std::string Event(const json& value) { return absl::StrCat("data: ", Dump(value), "\n\n"); }

constexpr char kDone[] = "data: [DONE]\n\n";

// The field an error message starts with ("top_p: must be ..." -> "top_p"), or "".
std::string ParamOf(absl::string_view message) {
  const size_t colon = message.find(": ");
  if (colon == absl::string_view::npos || colon == 0) return "";
  for (const char c : message.substr(0, colon)) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '.' || c == '[' || c == ']';
    if (!ok) return "";
  }
  return std::string(message.substr(0, colon));
}

json Usage(const engine::FinalResult& result) {
  return json{{"prompt_tokens", result.prompt_tokens},
              {"completion_tokens", result.generated_tokens},
              {"total_tokens", result.prompt_tokens + result.generated_tokens},
              {"prompt_tokens_details", {{"cached_tokens", result.cached_tokens}}}};
}

std::string DecodeText(const std::vector<int32_t>& ids) {
  // The byte tokenizer: ids are bytes; invalid UTF-8 becomes U+FFFD (tokenizer.h).
  static const absl::StatusOr<engine::ByteTokenizer> tokenizer =
      engine::ByteTokenizer::Create(engine::kByteVocabSize);
  absl::StatusOr<std::string> text = tokenizer->Decode(ids);
  return text.ok() ? *std::move(text) : std::string();
}

}  // namespace

HttpError ErrorResponse(int http_status, absl::string_view type, absl::string_view message,
                        absl::string_view param, absl::string_view code) {
  json error{{"message", std::string(message)},
             {"type", std::string(type)},
             {"param", param.empty() ? json() : json(std::string(param))},
             {"code", code.empty() ? json() : json(std::string(code))}};
  return HttpError{http_status, Dump(json{{"error", std::move(error)}})};
}

HttpError ErrorResponse(const absl::Status& status) {
  const absl::string_view message = status.message();
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kDataLoss:
      return ErrorResponse(400, "invalid_request_error", message, ParamOf(message));
    case absl::StatusCode::kUnauthenticated:
      return ErrorResponse(401, "authentication_error", message, "", "invalid_api_key");
    case absl::StatusCode::kPermissionDenied:
      return ErrorResponse(403, "permission_error", message);
    case absl::StatusCode::kNotFound:
      return ErrorResponse(404, "not_found_error", message, ParamOf(message));
    case absl::StatusCode::kAlreadyExists:
      return ErrorResponse(409, "invalid_request_error", message, ParamOf(message));
    case absl::StatusCode::kResourceExhausted:
      return ErrorResponse(429, "rate_limit_error", message);
    case absl::StatusCode::kUnavailable:
      return ErrorResponse(503, "service_unavailable", message);
    case absl::StatusCode::kDeadlineExceeded:
      return ErrorResponse(504, "timeout", message);
    default:
      return ErrorResponse(500, "server_error", message);
  }
}

std::string TokenText(int32_t token_id) {
  if (token_id >= 0 && token_id < 0x80) return std::string(1, static_cast<char>(token_id));
  constexpr char kHex[] = "0123456789abcdef";
  const auto byte = static_cast<uint8_t>(token_id);
  return absl::StrCat("bytes:\\x", std::string(1, kHex[byte >> 4]),
                      std::string(1, kHex[byte & 15]));
}

absl::string_view ApiFinishReason(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return "length";
    case engine::FinishReason::kStopString:
    case engine::FinishReason::kStopToken:
      return "stop";
    case engine::FinishReason::kCancelled:
      return "cancelled";
    case engine::FinishReason::kDeadline:
      return "deadline";
    case engine::FinishReason::kError:
      break;
  }
  return "error";
}

ResponseBuilder::ResponseBuilder(ResponseInfo info) : info_(std::move(info)) {}

namespace {

// Completions' logprobs object for `tokens`, the first of which is an echoed first prompt token
// without a log-probability when `null_first`; offsets count bytes from `*offset` on.
json CompletionLogprobs(const std::vector<engine::TokenOutput>& tokens, bool null_first,
                        int64_t* offset) {
  json out{{"tokens", json::array()},
           {"token_logprobs", json::array()},
           {"top_logprobs", json::array()},
           {"text_offset", json::array()}};
  for (size_t i = 0; i < tokens.size(); ++i) {
    const engine::TokenOutput& t = tokens[i];
    out["tokens"].push_back(TokenText(t.token_id));
    out["text_offset"].push_back(*offset);
    *offset += 1;  // one byte per token
    if (i == 0 && null_first) {
      out["token_logprobs"].push_back(nullptr);
      out["top_logprobs"].push_back(nullptr);
      continue;
    }
    out["token_logprobs"].push_back(t.logprob);
    json top = json::object();
    for (const engine::TokenLogprob& alt : t.top_logprobs)
      top[TokenText(alt.token_id)] = alt.logprob;
    out["top_logprobs"].push_back(std::move(top));
  }
  return out;
}

// The first prompt token: nothing before it, so no log-probability.
engine::TokenOutput Untallied(int32_t token_id) {
  engine::TokenOutput out;
  out.token_id = token_id;
  return out;
}

json ChatTokenLogprob(int32_t token_id, float logprob) {
  return json{{"token", TokenText(token_id)},
              {"logprob", logprob},
              {"bytes", json::array({static_cast<uint8_t>(token_id)})}};
}

json ChatLogprobs(const std::vector<engine::TokenOutput>& tokens) {
  json content = json::array();
  for (const engine::TokenOutput& t : tokens) {
    json entry = ChatTokenLogprob(t.token_id, t.logprob);
    json top = json::array();
    for (const engine::TokenLogprob& alt : t.top_logprobs) {
      top.push_back(ChatTokenLogprob(alt.token_id, alt.logprob));
    }
    entry["top_logprobs"] = std::move(top);
    content.push_back(std::move(entry));
  }
  return json{{"content", std::move(content)}};
}

}  // namespace

std::string ResponseBuilder::Chunk(const std::string& text,
                                   const std::vector<engine::TokenOutput>& tokens,
                                   bool with_first_prompt_token, const char* finish_reason) {
  const bool chat = info_.kind == ApiKind::kChat;
  json choice{{"index", 0}};
  if (chat) {
    choice["delta"] =
        finish_reason != nullptr && text.empty() ? json::object() : json{{"content", text}};
  } else {
    choice["text"] = text;
  }
  json logprobs;
  if (info_.logprobs >= 0 && finish_reason == nullptr) {
    logprobs = chat ? ChatLogprobs(tokens)
                    : CompletionLogprobs(tokens, with_first_prompt_token, &text_offset_);
  }
  choice["logprobs"] = std::move(logprobs);
  choice["finish_reason"] = finish_reason == nullptr ? json() : json(finish_reason);
  return Event(json{{"id", info_.id},
                    {"object", chat ? "chat.completion.chunk" : "text_completion"},
                    {"created", info_.created},
                    {"model", info_.model},
                    {"choices", json::array({std::move(choice)})}});
}

std::string ResponseBuilder::EchoChunk() {
  echo_sent_ = true;
  std::vector<engine::TokenOutput> tokens;
  if (info_.logprobs >= 0 && !info_.prompt.empty()) {
    tokens.push_back(Untallied(info_.prompt[0]));
    tokens.insert(tokens.end(), prompt_logprobs_.begin(), prompt_logprobs_.end());
  }
  return Chunk(DecodeText(info_.prompt), tokens, /*with_first_prompt_token=*/true, nullptr);
}

std::string ResponseBuilder::StreamStart() {
  if (info_.kind == ApiKind::kChat) {
    json choice{{"index", 0},
                {"delta", {{"role", "assistant"}, {"content", ""}}},
                {"logprobs", nullptr},
                {"finish_reason", nullptr}};
    return Event(json{{"id", info_.id},
                      {"object", "chat.completion.chunk"},
                      {"created", info_.created},
                      {"model", info_.model},
                      {"choices", json::array({std::move(choice)})}});
  }
  if (info_.echo && info_.logprobs < 0) return EchoChunk();
  return "";
}

std::string ResponseBuilder::StreamDelta(const engine::StreamDelta& delta) {
  prompt_logprobs_.insert(prompt_logprobs_.end(), delta.prompt_logprobs.begin(),
                          delta.prompt_logprobs.end());
  const bool has_output = !delta.text.empty() || (info_.logprobs >= 0 && !delta.tokens.empty());
  if (!has_output) return "";
  std::string out;
  if (info_.echo && !echo_sent_) out = EchoChunk();
  out += Chunk(delta.text, delta.tokens, /*with_first_prompt_token=*/false, nullptr);
  return out;
}

std::string ResponseBuilder::StreamEnd(const engine::FinalResult& result) {
  std::string out;
  if (info_.echo && !echo_sent_) out = EchoChunk();
  const std::string reason(ApiFinishReason(result.reason));
  out += Chunk("", {}, false, reason.c_str());
  if (result.reason == engine::FinishReason::kCancelled ||
      result.reason == engine::FinishReason::kDeadline ||
      result.reason == engine::FinishReason::kError) {
    absl::StatusOr<std::string> body = Body(result);
    out += absl::StrCat("data: ", ErrorResponse(body.status()).body, "\n\n");
  }
  if (info_.include_usage) {
    out += Event(
        json{{"id", info_.id},
             {"object", info_.kind == ApiKind::kChat ? "chat.completion.chunk" : "text_completion"},
             {"created", info_.created},
             {"model", info_.model},
             {"choices", json::array()},
             {"usage", Usage(result)}});
  }
  out += kDone;
  return out;
}

void ResponseBuilder::Add(const engine::StreamDelta& delta) {
  text_ += delta.text;
  if (info_.logprobs >= 0) tokens_.insert(tokens_.end(), delta.tokens.begin(), delta.tokens.end());
  prompt_logprobs_.insert(prompt_logprobs_.end(), delta.prompt_logprobs.begin(),
                          delta.prompt_logprobs.end());
}

absl::StatusOr<std::string> ResponseBuilder::Body(const engine::FinalResult& result) {
  switch (result.reason) {
    case engine::FinishReason::kCancelled:
      return absl::UnavailableError(
          absl::StrCat("the request was cancelled after ", result.generated_tokens,
                       " generated tokens (the server is shutting down)"));
    case engine::FinishReason::kDeadline:
      return absl::DeadlineExceededError(absl::StrCat(
          "the time limit passed after ", result.generated_tokens, " generated tokens"));
    case engine::FinishReason::kError:
      return absl::InternalError(absl::StrCat("generation failed: ", result.error.message()));
    default:
      break;
  }
  const bool chat = info_.kind == ApiKind::kChat;
  json choice{{"index", 0}};
  json logprobs;
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text_}};
    if (info_.logprobs >= 0) logprobs = ChatLogprobs(tokens_);
  } else {
    std::vector<engine::TokenOutput> tokens;
    if (info_.echo) {
      choice["text"] = DecodeText(info_.prompt) + text_;
      if (!info_.prompt.empty()) tokens.push_back(Untallied(info_.prompt[0]));
      tokens.insert(tokens.end(), prompt_logprobs_.begin(), prompt_logprobs_.end());
    } else {
      choice["text"] = text_;
    }
    tokens.insert(tokens.end(), tokens_.begin(), tokens_.end());
    int64_t offset = 0;
    if (info_.logprobs >= 0) logprobs = CompletionLogprobs(tokens, info_.echo, &offset);
  }
  choice["logprobs"] = std::move(logprobs);
  choice["finish_reason"] = std::string(ApiFinishReason(result.reason));
  return Dump(json{{"id", info_.id},
                   {"object", chat ? "chat.completion" : "text_completion"},
                   {"created", info_.created},
                   {"model", info_.model},
                   {"choices", json::array({std::move(choice)})},
                   {"usage", Usage(result)}});
}

std::string ModelsJson(absl::string_view model, int64_t created, int64_t max_model_len) {
  return Dump(json{{"object", "list"},
                   {"data", json::array({json{{"id", std::string(model)},
                                              {"object", "model"},
                                              {"created", created},
                                              {"owned_by", "polysketch"},
                                              {"max_model_len", max_model_len}}})}});
}

std::string TokenizeJson(const std::vector<int32_t>& tokens, int64_t max_model_len) {
  return Dump(json{{"tokens", tokens}, {"count", tokens.size()}, {"max_model_len", max_model_len}});
}

std::string DetokenizeJson(absl::string_view text) {
  return Dump(json{{"prompt", std::string(text)}});
}

}  // namespace ps::http
