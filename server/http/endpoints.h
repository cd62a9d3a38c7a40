// The HTTP API's endpoints that answer at once, without an engine request: GET /health,
// GET /v1/models, POST /tokenize, POST /detokenize, and the session extension POST /v1/sessions,
// DELETE /v1/sessions/<id>. Each takes what the connection read (and the caller's identity, which
// the connection has authenticated) and returns the answer; the connection only moves bytes.
// Thread-safe (what they call on the service and the scheduler is).
#ifndef POLYSKETCH_SERVER_HTTP_ENDPOINTS_H_
#define POLYSKETCH_SERVER_HTTP_ENDPOINTS_H_

#include <cstdint>
#include <string>

#include <absl/strings/string_view.h>

#include "server/http/chat_template.h"
#include "server/service/generation_service.h"

namespace ps::http {

// An answer: HTTP status and JSON body (OpenAI's error shape when not 2xx).
struct Answer {
  int status = 200;
  std::string body;
};

// What the endpoints need of the server.
struct EndpointContext {
  service::GenerationService* service = nullptr;  // not owned
  std::string model_name;
  int64_t created_unix_seconds = 0;
  const ChatTemplate* chat_template = nullptr;  // not owned
};

// 200 {"status":"ok"}; 503 {"status":"loading"} before the scheduler is set, {"status":
// "draining"} once it drains.
Answer Health(const EndpointContext& context);
// The served model (503 while loading).
Answer Models(const EndpointContext& context);
// The byte tokenizer's ids of `body`'s prompt or rendered messages (400 naming the field, 404 for
// another model, 400 past --max_prompt_bytes, 503 while loading).
Answer Tokenize(const EndpointContext& context, absl::string_view body);
// The text of `body`'s token ids, invalid UTF-8 replaced (400 naming the field).
Answer Detokenize(const EndpointContext& context, absl::string_view body);
// A new session of `identity`; closing one of its sessions (404 for an unknown or foreign id).
Answer OpenSession(const EndpointContext& context, const std::string& identity);
Answer CloseSession(const EndpointContext& context, const std::string& identity,
                    absl::string_view id);

}  // namespace ps::http

#endif  // POLYSKETCH_SERVER_HTTP_ENDPOINTS_H_
