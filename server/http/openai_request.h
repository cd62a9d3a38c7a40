// Requests of the OpenAI-compatible HTTP API (docs/serving.md, "HTTP API"): the JSON bodies of
// POST /v1/completions and /v1/chat/completions become a polysketch::v1::GenerateRequest, which
// then goes through the gRPC API's own validation (ConvertGenerateRequest via
// GenerationService::PrepareRequest), so both APIs accept exactly the same values and limits.
// This file checks what the JSON adds: types, the OpenAI names and forms of fields (a prompt as
// text or token ids, `stop` as a string or a list, chat messages), and which fields this server
// does not support. Every error is InvalidArgument whose message starts with the request's own
// field name ("temperature: must be a number, got \"hot\""); RenameProtoField turns the gRPC
// side's messages, which name proto fields, into the same form.
// Pure functions: no I/O; thread-safe.
#ifndef POLYSKETCH_SERVER_HTTP_OPENAI_REQUEST_H_
#define POLYSKETCH_SERVER_HTTP_OPENAI_REQUEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "polysketch/v1/generation.pb.h"
#include "server/http/chat_template.h"

namespace ps::http {

enum class ApiKind {
  kCompletion,  // POST /v1/completions
  kChat,        // POST /v1/chat/completions
};

// max_tokens when a /v1/completions request leaves it out (OpenAI's default for that endpoint);
// a chat request without it gets the gRPC API's default (kDefaultMaxNewTokens).
inline constexpr uint32_t kDefaultCompletionMaxTokens = 16;
// Most alternatives per token: `logprobs` of completions, `top_logprobs` of chat.
inline constexpr int32_t kMaxApiTopLogprobs = 20;
// Most nesting levels of a request body (the deepest valid request has 4: a chat message's
// content parts); deeper bodies are refused before they are parsed into a tree.
inline constexpr int kMaxJsonDepth = 16;

// A parsed request: the GenerateRequest and what only the HTTP side uses.
struct ApiRequest {
  ApiKind kind = ApiKind::kCompletion;
  polysketch::v1::GenerateRequest proto;
  std::string model;  // "" when the body has none (the served model is meant)
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool echo = false;           // completions: the prompt before the completion
  // Log-probabilities: -1 none; else the alternatives per token, [0, kMaxApiTopLogprobs]
  // (completions: `logprobs`; chat: `logprobs: true` with `top_logprobs`).
  int32_t logprobs = -1;
  std::string user;  // OpenAI's end-user id: accepted, logged nowhere
};

// Parses and checks the body of a completions or chat request (chat prompts are rendered with
// `chat_template`, whose stop strings are added). InvalidArgument naming the field otherwise:
// a body that is not a JSON object (with the parser's position), nested deeper than
// kMaxJsonDepth, a wrong type or value, n or best_of other than 1, an unsupported field given a
// non-default value (suffix, logit_bias, tools, functions, response_format other than text).
// Unknown fields are ignored, as OpenAI-compatible servers do.
[[nodiscard]] absl::StatusOr<ApiRequest> ParseApiRequest(absl::string_view body, ApiKind kind,
                                                         const ChatTemplate& chat_template);

// A message of the gRPC side's validation (which names proto fields: "sampling.top_p: ...",
// "max_new_tokens: ...", "stop.stop_strings[2]: ...", "prompt.token_ids[3]: ...") with the field
// renamed to the HTTP request's ("top_p", "max_tokens", "stop[2]", "prompt[3]"); other statuses
// unchanged.
absl::Status RenameProtoField(const absl::Status& status, ApiKind kind);

// The parsed body of POST /tokenize: `prompt` (a string) or, for chat, `messages` (rendered
// with the template). InvalidArgument naming the field.
[[nodiscard]] absl::StatusOr<std::string> ParseTokenizeRequest(absl::string_view body,
                                                               const ChatTemplate& chat_template,
                                                               std::string* model);
// The token ids of POST /detokenize's `tokens` (checked against [0, vocab_size)).
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> ParseDetokenizeRequest(absl::string_view body,
                                                                          int64_t vocab_size,
                                                                          std::string* model);

// The session extension (docs/sessions.md, "Over HTTP"): POST /v1/sessions takes no body and
// DELETE /v1/sessions/<id> none either; nothing to parse.

}  // namespace ps::http

#endif  // POLYSKETCH_SERVER_HTTP_OPENAI_REQUEST_H_
