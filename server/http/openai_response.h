// Responses of the OpenAI-compatible HTTP API: the JSON of completions and chat completions
// (whole, or as server-sent events ending in `data: [DONE]`), of errors in OpenAI's shape
// ({"error": {"message", "type", "param", "code"}}) with their HTTP status, and of the small
// endpoints (/v1/models, /tokenize, /detokenize). ResponseBuilder turns one request's engine
// events (scheduler.h: StreamDelta, FinalResult) into those bytes.
// Pure: no I/O. A ResponseBuilder is used by one thread at a time; the functions are thread-safe.
#ifndef POLYSKETCH_SERVER_HTTP_OPENAI_RESPONSE_H_
#define POLYSKETCH_SERVER_HTTP_OPENAI_RESPONSE_H_

#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "server/engine/serving/scheduler.h"
#include "server/http/openai_request.h"

namespace ps::http {

// An error answer: the HTTP status and the JSON body.
struct HttpError {
  int status = 500;
  std::string body;
};

// The answer for a failed request. Status codes: InvalidArgument, OutOfRange, FailedPrecondition,
// DataLoss -> 400 (invalid_request_error, `param` = the field the message starts with);
// Unauthenticated -> 401; PermissionDenied -> 403; NotFound -> 404; AlreadyExists -> 409;
// ResourceExhausted -> 429 (queue or in-flight prompt bytes full; retry later); Unavailable ->
// 503 (loading or draining); DeadlineExceeded -> 504; anything else 500.
HttpError ErrorResponse(const absl::Status& status);
// The same with an explicit HTTP status (413, 404 for unknown paths, 405, 408, ...).
HttpError ErrorResponse(int http_status, absl::string_view type, absl::string_view message,
                        absl::string_view param = "", absl::string_view code = "");

// The text of a token as OpenAI's logprobs show it: the byte itself when it is ASCII, else
// "bytes:\xNN" (the form OpenAI uses for tokens that are not whole characters).
std::string TokenText(int32_t token_id);

// OpenAI's finish_reason: "length", "stop" (stop string or token); "cancelled", "deadline",
// "error" for the endings OpenAI has no name for.
absl::string_view ApiFinishReason(engine::FinishReason reason);

struct ResponseInfo {
  ApiKind kind = ApiKind::kCompletion;
  std::string id;       // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;  // Unix seconds
  std::string model;
  bool include_usage = false;
  bool echo = false;
  int32_t logprobs = -1;  // ApiRequest::logprobs
  // The prompt's token ids (for echo: its text and, with logprobs, its tokens).
  std::vector<int32_t> prompt;
};

class ResponseBuilder {
 public:
  explicit ResponseBuilder(ResponseInfo info);

  // Streams: the events to send first (chat: the assistant role; completions with echo and no
  // logprobs: the prompt), for each engine delta, and at the end (the last chunk with the finish
  // reason, an error event for cancelled / deadline / error endings, the usage chunk when asked
  // for, then `data: [DONE]`). Each returns complete "data: ...\n\n" events, or "" for none.
  std::string StreamStart();
  std::string StreamDelta(const engine::StreamDelta& delta);
  std::string StreamEnd(const engine::FinalResult& result);

  // Whole responses: collect every delta, then the body; an error status for a request that did
  // not complete (cancelled: Unavailable; deadline: DeadlineExceeded; error: Internal).
  void Add(const engine::StreamDelta& delta);
  absl::StatusOr<std::string> Body(const engine::FinalResult& result);

 private:
  std::string Chunk(const std::string& text, const std::vector<engine::TokenOutput>& tokens,
                    bool with_first_prompt_token, const char* finish_reason);
  std::string EchoChunk();

  const ResponseInfo info_;
  std::string text_;                         // whole responses: the generated text
  std::vector<engine::TokenOutput> tokens_;  // whole responses (with logprobs): generated tokens
  std::vector<engine::TokenOutput> prompt_logprobs_;  // echo with logprobs: prompt tokens 1..n-1
  int64_t text_offset_ = 0;  // bytes of the choice's text before the next token
  bool echo_sent_ = false;
};

// GET /v1/models: the served model.
std::string ModelsJson(absl::string_view model, int64_t created, int64_t max_model_len);
// POST /tokenize and /detokenize.
std::string TokenizeJson(const std::vector<int32_t>& tokens, int64_t max_model_len);
std::string DetokenizeJson(absl::string_view text);

}  // namespace ps::http

#endif  // POLYSKETCH_SERVER_HTTP_OPENAI_RESPONSE_H_
