// Request bodies of the OpenAI-compatible API -> GenerateRequest. Types are checked here; ranges
// and limits by the gRPC side's ConvertGenerateRequest, whose messages RenameProtoField renames.
#include "server/http/openai_request.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/strip.h>
#include <nlohmann/json.hpp>

#include "base/status_macros.h"
#include "server/engine/model_io/json_util.h"

namespace ps::http {
namespace {

using nlohmann::json;

absl::Status Invalid(absl::string_view field, absl::string_view rule, const json& got) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": ", rule, ", got ", engine::JsonForError(got)));
}

// Nesting depth of a JSON text, without parsing it (strings skipped, escapes honoured), so a body
// of a million '[' never becomes a million nested arrays in memory.
absl::Status CheckDepth(absl::string_view text) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        return absl::InvalidArgumentError(
            absl::StrCat("body: JSON nested deeper than ", kMaxJsonDepth, " levels"));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<json> ParseObject(absl::string_view body) {
  if (body.empty()) return absl::InvalidArgumentError("body: empty; send a JSON object");
  PS_RETURN_IF_ERROR(CheckDepth(body));
  absl::StatusOr<json> parsed = engine::ParseStrictJson(body);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("body: not valid JSON: ", parsed.status().message()));
  }
  if (!parsed->is_object()) return Invalid("body", "must be a JSON object", *parsed);
  return parsed;
}

// The field's value, or null when it is absent or JSON null (both mean "unset", as in OpenAI).
const json* Get(const json& object, const char* key) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::optional<double>> Number(const json& object, const char* key) {
  const json* v = Get(object, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_number()) return Invalid(key, "must be a number", *v);
  return v->get<double>();
}

absl::StatusOr<std::optional<int64_t>> Integer(const json& object, const char* key, int64_t lo,
                                               int64_t hi) {
  const json* v = Get(object, key);
  if (v == nullptr) return std::nullopt;
  const std::optional<int64_t> i = engine::JsonToInt64(*v);
  if (!i.has_value() || *i < lo || *i > hi) {
    return Invalid(key, absl::StrCat("must be an integer in [", lo, ", ", hi, "]"), *v);
  }
  return i;
}

absl::StatusOr<std::optional<bool>> Bool(const json& object, const char* key) {
  const json* v = Get(object, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) return Invalid(key, "must be true or false", *v);
  return v->get<bool>();
}

absl::StatusOr<std::optional<std::string>> String(const json& object, const char* key) {
  const json* v = Get(object, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) return Invalid(key, "must be a string", *v);
  return v->get<std::string>();
}

// A list of token ids (each must fit an int32; the vocabulary is checked later).
absl::Status TokenIds(const json& list, absl::string_view field, polysketch::v1::TokenIds* out) {
  for (size_t i = 0; i < list.size(); ++i) {
    const std::optional<int64_t> id = engine::JsonToInt64(list[i]);
    if (!id.has_value() || *id < std::numeric_limits<int32_t>::min() ||
        *id > std::numeric_limits<int32_t>::max()) {
      return Invalid(absl::StrCat(field, "[", i, "]"), "must be an integer token id", list[i]);
    }
    out->add_ids(static_cast<int32_t>(*id));
  }
  return absl::OkStatus();
}

bool AllIntegers(const json& list) {
  for (const json& v : list) {
    if (!v.is_number_integer()) return false;
  }
  return true;
}

// `prompt`: a string, a list of token ids, or a list holding one of these (one prompt per
// request: n prompts are n requests).
absl::Status CompletionPrompt(const json& body, polysketch::v1::GenerateRequest* proto) {
  const json* prompt = Get(body, "prompt");
  if (prompt == nullptr) return absl::InvalidArgumentError("prompt: required");
  if (prompt->is_string()) {
    proto->set_text(prompt->get<std::string>());
    return absl::OkStatus();
  }
  constexpr char kForms[] = "must be a string, a list of token ids, or a list of one of these";
  if (!prompt->is_array()) return Invalid("prompt", kForms, *prompt);
  if (prompt->empty()) return absl::InvalidArgumentError("prompt: must not be empty");
  if (AllIntegers(*prompt)) return TokenIds(*prompt, "prompt", proto->mutable_token_ids());
  if (prompt->size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: one prompt per request, got a list of ",
                                                   prompt->size(), "; send one each"));
  }
  const json& only = (*prompt)[0];
  if (only.is_string()) {
    proto->set_text(only.get<std::string>());
    return absl::OkStatus();
  }
  if (only.is_array()) return TokenIds(only, "prompt[0]", proto->mutable_token_ids());
  return Invalid("prompt", kForms, *prompt);
}

// A chat message's content: a string, or a list of {"type": "text", "text": ...} parts.
absl::StatusOr<std::string> MessageContent(const json& message, size_t index, bool may_be_null) {
  const std::string field = absl::StrCat("messages[", index, "].content");
  const json* content = Get(message, "content");
  if (content == nullptr) {
    if (may_be_null) return std::string();
    return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  }
  if (content->is_string()) return content->get<std::string>();
  if (!content->is_array()) {
    return Invalid(field, "must be a string or a list of text parts", *content);
  }
  std::string text;
  for (size_t j = 0; j < content->size(); ++j) {
    const json& part = (*content)[j];
    const std::string part_field = absl::StrCat(field, "[", j, "]");
    if (!part.is_object()) return Invalid(part_field, "must be an object", part);
    const json* type = Get(part, "type");
    if (type == nullptr || !type->is_string() || type->get<std::string>() != "text") {
      return Invalid(absl::StrCat(part_field, ".type"), "only \"text\" parts are supported",
                     type == nullptr ? json() : *type);
    }
    const json* part_text = Get(part, "text");
    if (part_text == nullptr || !part_text->is_string()) {
      return Invalid(absl::StrCat(part_field, ".text"), "must be a string",
                     part_text == nullptr ? json() : *part_text);
    }
    text += part_text->get<std::string>();
  }
  return text;
}

absl::StatusOr<std::string> ChatPrompt(const json& body, const ChatTemplate& chat_template) {
  const json* messages = Get(body, "messages");
  if (messages == nullptr) return absl::InvalidArgumentError("messages: required");
  if (!messages->is_array() || messages->empty()) {
    return Invalid("messages", "must be a non-empty list of messages", *messages);
  }
  std::vector<ChatMessage> parsed;
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    if (!m.is_object()) return Invalid(absl::StrCat("messages[", i, "]"), "must be an object", m);
    const json* role = Get(m, "role");
    if (role == nullptr || !role->is_string()) {
      return Invalid(absl::StrCat("messages[", i, "].role"), "must be a string",
                     role == nullptr ? json() : *role);
    }
    if (const json* calls = Get(m, "tool_calls"); calls != nullptr && !calls->empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "].tool_calls: tools are not supported"));
    }
    ChatMessage message;
    message.role = role->get<std::string>();
    PS_ASSIGN_OR_RETURN(message.content,
                        MessageContent(m, i, /*may_be_null=*/message.role == "assistant"));
    parsed.push_back(std::move(message));
  }
  return RenderChat(chat_template, parsed);
}

// `stop`: a string or a list of strings (the gRPC side checks count and lengths).
absl::Status Stops(const json& body, polysketch::v1::StopParams* stop) {
  const json* value = Get(body, "stop");
  if (value == nullptr) return absl::OkStatus();
  if (value->is_string()) {
    stop->add_stop_strings(value->get<std::string>());
    return absl::OkStatus();
  }
  if (!value->is_array()) return Invalid("stop", "must be a string or a list of strings", *value);
  for (size_t i = 0; i < value->size(); ++i) {
    if (!(*value)[i].is_string()) {
      return Invalid(absl::StrCat("stop[", i, "]"), "must be a string", (*value)[i]);
    }
    stop->add_stop_strings((*value)[i].get<std::string>());
  }
  return absl::OkStatus();
}

// Fields OpenAI defines that this server does not implement: refused when they ask for
// something, accepted at their neutral value.
absl::Status Unsupported(const json& body) {
  if (const json* suffix = Get(body, "suffix");
      suffix != nullptr && !(suffix->is_string() && suffix->get<std::string>().empty())) {
    return Invalid("suffix", "is not supported (send null or \"\")", *suffix);
  }
  for (const char* key : {"logit_bias", "tools", "functions"}) {
    if (const json* v = Get(body, key); v != nullptr && !(v->is_structured() && v->empty())) {
      return Invalid(key, "is not supported", *v);
    }
  }
  for (const char* key : {"tool_choice", "function_call"}) {
    if (const json* v = Get(body, key);
        v != nullptr && !(v->is_string() && v->get<std::string>() == "none")) {
      return Invalid(key, "is not supported (tools are not)", *v);
    }
  }
  if (const json* format = Get(body, "response_format"); format != nullptr) {
    const json* type = format->is_object() ? Get(*format, "type") : nullptr;
    if (type == nullptr || !type->is_string() || type->get<std::string>() != "text") {
      return Invalid("response_format", "only {\"type\": \"text\"} is supported", *format);
    }
  }
  return absl::OkStatus();
}

absl::Status Sampling(const json& body, polysketch::v1::SamplingParams* s) {
  PS_ASSIGN_OR_RETURN(std::optional<double> temperature, Number(body, "temperature"));
  if (temperature) s->set_temperature(static_cast<float>(*temperature));
  PS_ASSIGN_OR_RETURN(std::optional<double> top_p, Number(body, "top_p"));
  if (top_p) s->set_top_p(static_cast<float>(*top_p));
  // -1 is vLLM's "off" (0 here).
  PS_ASSIGN_OR_RETURN(std::optional<int64_t> top_k,
                      Integer(body, "top_k", -1, std::numeric_limits<int32_t>::max()));
  if (top_k) s->set_top_k(static_cast<int32_t>(std::max<int64_t>(*top_k, 0)));
  PS_ASSIGN_OR_RETURN(std::optional<double> min_p, Number(body, "min_p"));
  if (min_p) s->set_min_p(static_cast<float>(*min_p));
  PS_ASSIGN_OR_RETURN(std::optional<double> presence, Number(body, "presence_penalty"));
  if (presence) s->set_presence_penalty(static_cast<float>(*presence));
  PS_ASSIGN_OR_RETURN(std::optional<double> frequency, Number(body, "frequency_penalty"));
  if (frequency) s->set_frequency_penalty(static_cast<float>(*frequency));
  PS_ASSIGN_OR_RETURN(std::optional<double> repetition, Number(body, "repetition_penalty"));
  if (repetition) s->set_repetition_penalty(static_cast<float>(*repetition));
  if (const json* seed = Get(body, "seed"); seed != nullptr) {
    if (seed->is_number_unsigned()) {
      s->set_seed(seed->get<uint64_t>());
    } else {
      return Invalid("seed", "must be an integer in [0, 2^64)", *seed);
    }
  }
  return absl::OkStatus();
}

absl::Status Logprobs(const json& body, ApiRequest* out) {
  polysketch::v1::GenerateRequest& proto = out->proto;
  if (out->kind == ApiKind::kCompletion) {
    PS_ASSIGN_OR_RETURN(std::optional<int64_t> logprobs,
                        Integer(body, "logprobs", 0, kMaxApiTopLogprobs));
    if (logprobs) out->logprobs = static_cast<int32_t>(*logprobs);
  } else {
    PS_ASSIGN_OR_RETURN(std::optional<bool> logprobs, Bool(body, "logprobs"));
    PS_ASSIGN_OR_RETURN(std::optional<int64_t> top,
                        Integer(body, "top_logprobs", 0, kMaxApiTopLogprobs));
    if (top && !logprobs.value_or(false)) {
      return absl::InvalidArgumentError("top_logprobs: needs \"logprobs\": true");
    }
    if (logprobs.value_or(false)) out->logprobs = static_cast<int32_t>(top.value_or(0));
  }
  if (out->logprobs >= 0) {
    proto.set_logprobs(true);
    proto.set_top_logprobs(static_cast<uint32_t>(out->logprobs));
    // Echoed prompt tokens get their log-probabilities too (the gRPC API's prompt_logprobs).
    if (out->echo) {
      proto.set_prompt_logprobs(true);
      proto.set_prompt_top_logprobs(static_cast<uint32_t>(out->logprobs));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ApiRequest> ParseApiRequest(absl::string_view body, ApiKind kind,
                                           const ChatTemplate& chat_template) {
  PS_ASSIGN_OR_RETURN(json root, ParseObject(body));
  ApiRequest out;
  out.kind = kind;
  polysketch::v1::GenerateRequest& proto = out.proto;
  PS_ASSIGN_OR_RETURN(std::optional<std::string> model, String(root, "model"));
  out.model = model.value_or("");
  PS_RETURN_IF_ERROR(Unsupported(root));
  for (const char* key : {"n", "best_of"}) {
    PS_ASSIGN_OR_RETURN(std::optional<int64_t> n, Integer(root, key, 1, 1));
    (void)n;
  }
  if (kind == ApiKind::kCompletion) {
    PS_RETURN_IF_ERROR(CompletionPrompt(root, &proto));
    PS_ASSIGN_OR_RETURN(std::optional<bool> echo, Bool(root, "echo"));
    out.echo = echo.value_or(false);
  } else {
    PS_ASSIGN_OR_RETURN(std::string prompt, ChatPrompt(root, chat_template));
    proto.set_text(std::move(prompt));
  }
  // max_tokens; chat's newer name max_completion_tokens wins when both are given.
  PS_ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens,
                      Integer(root, "max_tokens", 0, std::numeric_limits<uint32_t>::max()));
  if (kind == ApiKind::kChat) {
    PS_ASSIGN_OR_RETURN(
        std::optional<int64_t> max_completion_tokens,
        Integer(root, "max_completion_tokens", 0, std::numeric_limits<uint32_t>::max()));
    if (max_completion_tokens) max_tokens = max_completion_tokens;
  } else if (!max_tokens) {
    max_tokens = kDefaultCompletionMaxTokens;
  }
  if (max_tokens) proto.set_max_new_tokens(static_cast<uint32_t>(*max_tokens));
  PS_ASSIGN_OR_RETURN(std::optional<int64_t> min_tokens,
                      Integer(root, "min_tokens", 0, std::numeric_limits<uint32_t>::max()));
  if (min_tokens) proto.set_min_new_tokens(static_cast<uint32_t>(*min_tokens));
  PS_RETURN_IF_ERROR(Sampling(root, proto.mutable_sampling()));
  PS_RETURN_IF_ERROR(Stops(root, proto.mutable_stop()));
  if (kind == ApiKind::kChat) {
    for (const std::string& stop : chat_template.stop) proto.mutable_stop()->add_stop_strings(stop);
  }
  if (const json* ids = Get(root, "stop_token_ids"); ids != nullptr) {
    if (!ids->is_array()) return Invalid("stop_token_ids", "must be a list of token ids", *ids);
    polysketch::v1::TokenIds parsed;
    PS_RETURN_IF_ERROR(TokenIds(*ids, "stop_token_ids", &parsed));
    proto.mutable_stop()->mutable_stop_token_ids()->Assign(parsed.ids().begin(),
                                                           parsed.ids().end());
  }
  PS_ASSIGN_OR_RETURN(std::optional<bool> include_stop, Bool(root, "include_stop_str_in_output"));
  proto.mutable_stop()->set_include_stop_string(include_stop.value_or(false));
  PS_ASSIGN_OR_RETURN(std::optional<bool> ignore_eos, Bool(root, "ignore_eos"));
  proto.mutable_stop()->set_ignore_eos(ignore_eos.value_or(false));
  PS_RETURN_IF_ERROR(Logprobs(root, &out));
  PS_ASSIGN_OR_RETURN(std::optional<bool> stream, Bool(root, "stream"));
  out.stream = stream.value_or(false);
  if (const json* options = Get(root, "stream_options"); options != nullptr) {
    if (!options->is_object()) return Invalid("stream_options", "must be an object", *options);
    PS_ASSIGN_OR_RETURN(std::optional<bool> usage, Bool(*options, "include_usage"));
    if (usage.has_value() && !out.stream) {
      return absl::InvalidArgumentError("stream_options: only allowed with \"stream\": true");
    }
    out.include_usage = usage.value_or(false);
  }
  PS_ASSIGN_OR_RETURN(std::optional<std::string> user, String(root, "user"));
  out.user = user.value_or("");
  PS_ASSIGN_OR_RETURN(std::optional<std::string> session, String(root, "session_id"));
  if (session) proto.set_session_id(*session);
  // vLLM's cache_salt: separates prefix-cache entries (GenerateRequest.cache_salt).
  PS_ASSIGN_OR_RETURN(std::optional<std::string> salt, String(root, "cache_salt"));
  if (salt) proto.set_cache_salt(*salt);
  return out;
}

absl::Status RenameProtoField(const absl::Status& status, ApiKind kind) {
  if (status.code() != absl::StatusCode::kInvalidArgument &&
      status.code() != absl::StatusCode::kOutOfRange) {
    return status;
  }
  const absl::string_view message = status.message();
  const size_t colon = message.find(": ");
  if (colon == absl::string_view::npos) return status;
  const absl::string_view field = message.substr(0, colon);
  if (absl::StrContains(field, ' ')) return status;
  const absl::string_view prompt = kind == ApiKind::kChat ? "messages" : "prompt";
  std::string renamed;
  absl::string_view rest = field;
  if (absl::ConsumePrefix(&rest, "sampling.")) {
    renamed = std::string(rest);
  } else if (field == "max_new_tokens") {
    renamed = "max_tokens";
  } else if (field == "min_new_tokens") {
    renamed = "min_tokens";
  } else if (absl::ConsumePrefix(&rest, "stop.stop_strings")) {
    renamed = absl::StrCat("stop", rest);
  } else if (absl::ConsumePrefix(&rest, "stop.stop_token_ids")) {
    renamed = absl::StrCat("stop_token_ids", rest);
  } else if (absl::StartsWith(field, "stop.")) {
    renamed = "stop";
  } else if (absl::ConsumePrefix(&rest, "prompt.token_ids")) {
    renamed = absl::StrCat("prompt", rest);
  } else if (field == "prompt.text" || field == "prompt") {
    renamed = std::string(prompt);
  } else if (field == "top_logprobs") {
    renamed = kind == ApiKind::kChat ? "top_logprobs" : "logprobs";
  } else if (field == "prompt_logprobs" || field == "prompt_top_logprobs") {
    renamed = "echo";
  } else {
    return status;
  }
  return absl::Status(status.code(), absl::StrCat(renamed, message.substr(colon)));
}

absl::StatusOr<std::string> ParseTokenizeRequest(absl::string_view body,
                                                 const ChatTemplate& chat_template,
                                                 std::string* model) {
  PS_ASSIGN_OR_RETURN(json root, ParseObject(body));
  PS_ASSIGN_OR_RETURN(std::optional<std::string> name, String(root, "model"));
  *model = name.value_or("");
  if (Get(root, "messages") != nullptr) return ChatPrompt(root, chat_template);
  PS_ASSIGN_OR_RETURN(std::optional<std::string> prompt, String(root, "prompt"));
  if (!prompt) return absl::InvalidArgumentError("prompt: required (or messages)");
  return *prompt;
}

absl::StatusOr<std::vector<int32_t>> ParseDetokenizeRequest(absl::string_view body,
                                                            int64_t vocab_size,
                                                            std::string* model) {
  PS_ASSIGN_OR_RETURN(json root, ParseObject(body));
  PS_ASSIGN_OR_RETURN(std::optional<std::string> name, String(root, "model"));
  *model = name.value_or("");
  const json* tokens = Get(root, "tokens");
  if (tokens == nullptr) return absl::InvalidArgumentError("tokens: required");
  if (!tokens->is_array()) return Invalid("tokens", "must be a list of token ids", *tokens);
  std::vector<int32_t> ids;
  ids.reserve(tokens->size());
  for (size_t i = 0; i < tokens->size(); ++i) {
    const std::optional<int64_t> id = engine::JsonToInt64((*tokens)[i]);
    if (!id.has_value() || *id < 0 || *id >= vocab_size) {
      return Invalid(absl::StrCat("tokens[", i, "]"),
                     absl::StrCat("must be an integer in [0, ", vocab_size, ")"), (*tokens)[i]);
    }
    ids.push_back(static_cast<int32_t>(*id));
  }
  return ids;
}

}  // namespace ps::http
