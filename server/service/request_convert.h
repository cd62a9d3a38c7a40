// Turns the API's protos into the engine's types and back: GenerateRequest -> EngineRequest with
// every field validated (the service's first step, architecture.md "One request, end to end"),
// and ModelInfo from the served model's config, state layout and the server's limits.
// Pure functions: no gRPC, no scheduler; thread-safe.
#ifndef POLYSKETCH_SERVER_SERVICE_REQUEST_CONVERT_H_
#define POLYSKETCH_SERVER_SERVICE_REQUEST_CONVERT_H_

#include <cstdint>
#include <functional>
#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/time/time.h>

#include "polysketch/v1/generation.pb.h"
#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/tokenizer.h"
#include "server/engine/serving/scheduler.h"

namespace ps::service {

// Most bytes of a client's request_id.
inline constexpr size_t kMaxRequestIdBytes = 128;

// Checks an id field (request_id, session_id): at most kMaxRequestIdBytes of printable ASCII.
// InvalidArgument naming `field` otherwise.
absl::Status ValidateId(absl::string_view field, absl::string_view id);
// max_new_tokens when a request leaves it unset.
inline constexpr int64_t kDefaultMaxNewTokens = 256;

// What a request may ask for: the model's and the server's limits.
struct RequestLimits {
  int64_t vocab_size = 0;            // the model's V
  int64_t max_context = 0;           // Model::max_context(): prompt + generated tokens
  int64_t max_prompt_tokens = 0;     // server flag; the prompt must also fit max_context
  int64_t max_new_tokens_limit = 0;  // largest max_new_tokens accepted (server flag)
};

// A validated request: the engine request (without id when the client gave none, observer and
// deadline, which the service sets) and what the service needs besides.
struct ConvertedRequest {
  engine::EngineRequest request;
  absl::Duration time_limit = absl::InfiniteDuration();  // time_limit_ms; infinite when 0
  bool seed_picked = false;  // the request had no seed: request.sampling.seed was drawn
};

// Validates `proto` against `limits` and converts it. Unset optional sampling fields take their
// defaults (temperature 1, top_p 1, repetition_penalty 1), an unset max_new_tokens becomes
// kDefaultMaxNewTokens (an explicit 0 stays 0: generate nothing), an unset seed is drawn from
// `random_seed` (a process-wide RNG when null). Errors: InvalidArgument whose message starts with
// the field path and gives the allowed range and the value, e.g.
// "sampling.top_p: must be in (0, 1], got 0",
// "prompt.token_ids[3]: must be in [0, 256), got 300",
// "prompt.text: not valid UTF-8 at byte 7",
// "prompt_top_logprobs: must be 0 unless prompt_logprobs is set, got 5";
// prompt_logprobs with a session_id is refused naming prompt_logprobs.
[[nodiscard]] absl::StatusOr<ConvertedRequest> ConvertGenerateRequest(
    const polysketch::v1::GenerateRequest& proto, const RequestLimits& limits,
    const std::function<uint64_t()>& random_seed = nullptr);

// Text fields are checked with the tokenizer's UTF-8 validator.
using engine::FirstInvalidUtf8Byte;

// The finish reason in the API's enum.
polysketch::v1::FinishReason ToProto(engine::FinishReason reason);

// The last message's FinalInfo from the engine's result.
void FillFinalInfo(const engine::FinalResult& result, polysketch::v1::FinalInfo* info);

// What GetModelInfo reports besides the model's config.
struct ModelInfoExtras {
  std::string name;                     // the model directory's name
  std::string device;                   // "cpu", "cuda"
  int64_t state_bytes_per_request = 0;  // StateLayout::bytes_per_slot()
  RequestLimits limits;
  int64_t state_slots = 0;
  int64_t max_waiting = 0;
  int64_t max_waiting_tokens = 0;
};
polysketch::v1::ModelInfo BuildModelInfo(const engine::ModelConfig& config,
                                         const ModelInfoExtras& extras);

}  // namespace ps::service

#endif  // POLYSKETCH_SERVER_SERVICE_REQUEST_CONVERT_H_
