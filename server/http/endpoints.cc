// The immediate endpoints of the HTTP API (endpoints.h).
#include "server/http/endpoints.h"

#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <nlohmann/json.hpp>

#include "server/engine/model_io/tokenizer.h"
#include "server/http/openai_request.h"
#include "server/http/openai_response.h"

namespace ps::http {
namespace {

Answer Error(const absl::Status& status) {
  HttpError error = ErrorResponse(status);
  return Answer{error.status, std::move(error.body)};
}

Answer Loading() { return Error(absl::UnavailableError("the model is loading")); }

// A model named in a body must be the served one.
bool OtherModel(const EndpointContext& context, const std::string& model, Answer* answer) {
  if (model.empty() || model == context.model_name) return false;
  HttpError error = ErrorResponse(
      404, "invalid_request_error",
      absl::StrCat("model: the model \"", model, "\" does not exist; this server serves \"",
                   context.model_name, "\""),
      "model", "model_not_found");
  *answer = Answer{error.status, std::move(error.body)};
  return true;
}

}  // namespace

Answer Health(const EndpointContext& context) {
  engine::Scheduler* scheduler = context.service->scheduler();
  if (scheduler == nullptr) return Answer{503, R"({"status":"loading"})"};
  const engine::SchedulerStats stats = scheduler->Stats();
  if (stats.failed) return Answer{503, R"({"status":"failed"})"};
  if (stats.draining) return Answer{503, R"({"status":"draining"})"};
  return Answer{200, R"({"status":"ok"})"};
}

Answer Models(const EndpointContext& context) {
  engine::Scheduler* scheduler = context.service->scheduler();
  if (scheduler == nullptr) return Loading();
  return Answer{200, ModelsJson(context.model_name, context.created_unix_seconds,
                                scheduler->model().max_context())};
}

Answer Tokenize(const EndpointContext& context, absl::string_view body) {
  engine::Scheduler* scheduler = context.service->scheduler();
  if (scheduler == nullptr) return Loading();
  std::string model;
  absl::StatusOr<std::string> text = ParseTokenizeRequest(body, *context.chat_template, &model);
  if (!text.ok()) return Error(text.status());
  Answer answer;
  if (OtherModel(context, model, &answer)) return answer;
  const int64_t limit = context.service->options().max_prompt_bytes;
  if (static_cast<int64_t>(text->size()) > limit) {
    return Error(absl::InvalidArgumentError(absl::StrCat(
        "prompt: must be at most ", limit, " bytes (--max_prompt_bytes), got ", text->size())));
  }
  // The byte tokenizer: one id per byte (ByteTokenizer::Encode).
  std::vector<int32_t> tokens;
  tokens.reserve(text->size());
  for (const char c : *text) tokens.push_back(static_cast<unsigned char>(c));
  return Answer{200, TokenizeJson(tokens, scheduler->model().max_context())};
}

Answer Detokenize(const EndpointContext& context, absl::string_view body) {
  engine::Scheduler* scheduler = context.service->scheduler();
  if (scheduler == nullptr) return Loading();
  std::string model;
  absl::StatusOr<std::vector<int32_t>> ids =
      ParseDetokenizeRequest(body, scheduler->config().vocab_size, &model);
  if (!ids.ok()) return Error(ids.status());
  Answer answer;
  if (OtherModel(context, model, &answer)) return answer;
  absl::StatusOr<engine::ByteTokenizer> tokenizer =
      engine::ByteTokenizer::Create(scheduler->config().vocab_size);
  if (!tokenizer.ok()) return Error(tokenizer.status());
  absl::StatusOr<std::string> text = tokenizer->Decode(*ids);
  if (!text.ok()) return Error(text.status());
  return Answer{200, DetokenizeJson(*text)};
}

Answer OpenSession(const EndpointContext& context, const std::string& identity) {
  engine::Scheduler* scheduler = context.service->scheduler();
  if (scheduler == nullptr) return Loading();
  absl::StatusOr<std::string> id = scheduler->OpenSession(identity);
  if (!id.ok()) return Error(id.status());
  return Answer{200, nlohmann::json{{"id", *id}, {"object", "session"}}.dump()};
}

Answer CloseSession(const EndpointContext& context, const std::string& identity,
                    absl::string_view id) {
  engine::Scheduler* scheduler = context.service->scheduler();
  if (scheduler == nullptr) return Loading();
  if (id.empty()) return Error(absl::InvalidArgumentError("session_id: must not be empty"));
  if (absl::Status valid = service::ValidateId("session_id", id); !valid.ok()) return Error(valid);
  if (absl::Status closed = scheduler->CloseSession(id, identity); !closed.ok()) {
    return Error(closed);
  }
  return Answer{
      200,
      nlohmann::json{{"id", std::string(id)}, {"object", "session"}, {"deleted", true}}.dump()};
}

}  // namespace ps::http
