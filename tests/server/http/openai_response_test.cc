// Engine events -> OpenAI JSON: whole completions and chat completions, the server-sent events of
// streams (chunks, finish reason, usage, [DONE]), logprobs in both shapes, echo with prompt
// log-probabilities, errors in OpenAI's shape with their HTTP status.
#include "server/http/openai_response.h"

#include <string>
#include <vector>

#include <absl/strings/str_split.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/testing/status_matchers.h"

namespace ps::http {
namespace {

using nlohmann::json;
using ::ps::test::StatusIs;
using ::testing::ElementsAre;

ResponseInfo Info(ApiKind kind) {
  ResponseInfo info;
  info.kind = kind;
  info.id = kind == ApiKind::kChat ? "chatcmpl-7" : "cmpl-7";
  info.created = 1700000000;
  info.model = "tiny";
  return info;
}

engine::TokenOutput Token(int32_t id, float logprob, std::vector<engine::TokenLogprob> top = {}) {
  engine::TokenOutput t;
  t.token_id = id;
  t.logprob = logprob;
  t.top_logprobs = std::move(top);
  return t;
}

engine::StreamDelta Delta(std::string text, std::vector<engine::TokenOutput> tokens) {
  engine::StreamDelta d;
  d.text = std::move(text);
  d.tokens = std::move(tokens);
  return d;
}

engine::FinalResult Final(engine::FinishReason reason, int64_t prompt, int64_t generated) {
  engine::FinalResult r;
  r.reason = reason;
  r.prompt_tokens = prompt;
  r.generated_tokens = generated;
  r.cached_tokens = 1;
  return r;
}

// The JSON of each "data: ..." event ("[DONE]" as a string).
std::vector<json> Events(const std::string& sse) {
  std::vector<json> out;
  for (absl::string_view event : absl::StrSplit(sse, "\n\n", absl::SkipEmpty())) {
    EXPECT_TRUE(absl::ConsumePrefix(&event, "data: ")) << event;
    out.push_back(event == "[DONE]" ? json("[DONE]") : json::parse(event));
  }
  return out;
}

TEST(OpenAiResponseTest, WholeCompletion) {
  ResponseBuilder b(Info(ApiKind::kCompletion));
  b.Add(Delta("Let th", {Token('L', 0), Token('e', 0)}));
  b.Add(Delta("ere", {}));
  PS_ASSERT_OK_AND_ASSIGN(std::string body, b.Body(Final(engine::FinishReason::kStopString, 4, 9)));
  const json j = json::parse(body);
  EXPECT_EQ(j["id"], "cmpl-7");
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["created"], 1700000000);
  EXPECT_EQ(j["model"], "tiny");
  EXPECT_EQ(j["choices"][0]["text"], "Let there");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["usage"], json::parse(R"({"prompt_tokens": 4, "completion_tokens": 9,
      "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 1}})"));
}

TEST(OpenAiResponseTest, WholeChatWithLogprobs) {
  ResponseInfo info = Info(ApiKind::kChat);
  info.logprobs = 1;
  ResponseBuilder b(info);
  b.Add(Delta("A", {Token('A', -0.5f, {{'A', -0.5f}})}));
  PS_ASSERT_OK_AND_ASSIGN(std::string body, b.Body(Final(engine::FinishReason::kLength, 3, 1)));
  const json j = json::parse(body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"], json::parse(R"({"role": "assistant", "content": "A"})"));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["choices"][0]["logprobs"], json::parse(R"({"content": [{"token": "A",
      "logprob": -0.5, "bytes": [65], "top_logprobs": [{"token": "A", "logprob": -0.5,
      "bytes": [65]}]}]})"));
}

TEST(OpenAiResponseTest, EchoWithPromptLogprobs) {
  ResponseInfo info = Info(ApiKind::kCompletion);
  info.echo = true;
  info.logprobs = 0;
  info.prompt = {'H', 'i'};
  ResponseBuilder b(info);
  engine::StreamDelta prompt;
  prompt.prompt_logprobs = {Token('i', -2.0f)};
  b.Add(prompt);
  b.Add(Delta("!", {Token('!', -1.0f)}));
  PS_ASSERT_OK_AND_ASSIGN(std::string body, b.Body(Final(engine::FinishReason::kLength, 2, 1)));
  const json lp = json::parse(body)["choices"][0]["logprobs"];
  EXPECT_EQ(json::parse(body)["choices"][0]["text"], "Hi!");
  EXPECT_EQ(lp["tokens"], json::parse(R"(["H", "i", "!"])"));
  // The first prompt token has nothing before it: null, as OpenAI's echo gives.
  EXPECT_EQ(lp["token_logprobs"], json::parse(R"([null, -2.0, -1.0])"));
  EXPECT_EQ(lp["text_offset"], json::parse(R"([0, 1, 2])"));
  EXPECT_EQ(lp["top_logprobs"], json::parse(R"([null, {}, {}])"));
}

TEST(OpenAiResponseTest, NonAsciiTokensAreNamedByTheirBytes) {
  EXPECT_EQ(TokenText('a'), "a");
  EXPECT_EQ(TokenText(0xE2), "bytes:\\xe2");
  EXPECT_EQ(TokenText(0x80), "bytes:\\x80");
}

TEST(OpenAiResponseTest, CompletionStream) {
  ResponseInfo info = Info(ApiKind::kCompletion);
  info.include_usage = true;
  ResponseBuilder b(info);
  EXPECT_EQ(b.StreamStart(), "");
  EXPECT_EQ(b.StreamDelta(Delta("", {Token(0xE2, 0)})), "");  // no text yet, no logprobs asked
  std::string sse = b.StreamDelta(Delta("ab", {Token('a', 0), Token('b', 0)}));
  sse += b.StreamEnd(Final(engine::FinishReason::kLength, 5, 3));
  const std::vector<json> events = Events(sse);
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events[0]["choices"][0]["text"], "ab");
  EXPECT_TRUE(events[0]["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(events[0]["object"], "text_completion");
  EXPECT_EQ(events[1]["choices"][0]["text"], "");
  EXPECT_EQ(events[1]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(events[2]["choices"].empty());
  EXPECT_EQ(events[2]["usage"]["completion_tokens"], 3);
  EXPECT_EQ(events[3], "[DONE]");
}

TEST(OpenAiResponseTest, ChatStreamStartsWithTheRoleAndEndsWithAnEmptyDelta) {
  ResponseBuilder b(Info(ApiKind::kChat));
  std::string sse = b.StreamStart();
  sse += b.StreamDelta(Delta("Hi", {}));
  sse += b.StreamEnd(Final(engine::FinishReason::kStopString, 2, 2));
  const std::vector<json> events = Events(sse);
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events[0]["choices"][0]["delta"], json::parse(R"({"role": "assistant",
      "content": ""})"));
  EXPECT_EQ(events[1]["choices"][0]["delta"], json::parse(R"({"content": "Hi"})"));
  EXPECT_EQ(events[1]["object"], "chat.completion.chunk");
  EXPECT_EQ(events[2]["choices"][0]["delta"], json::object());
  EXPECT_EQ(events[2]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(events[3], "[DONE]");
}

TEST(OpenAiResponseTest, StreamedEchoComesFirst) {
  ResponseInfo info = Info(ApiKind::kCompletion);
  info.echo = true;
  info.prompt = {'H', 'i'};
  ResponseBuilder b(info);
  const std::vector<json> start = Events(b.StreamStart());
  ASSERT_EQ(start.size(), 1u);
  EXPECT_EQ(start[0]["choices"][0]["text"], "Hi");
  // With logprobs the echo waits for the prompt's log-probabilities.
  info.logprobs = 0;
  ResponseBuilder with_logprobs(info);
  EXPECT_EQ(with_logprobs.StreamStart(), "");
  engine::StreamDelta prompt;
  prompt.prompt_logprobs = {Token('i', -2.0f)};
  EXPECT_EQ(with_logprobs.StreamDelta(prompt), "");
  const std::vector<json> events = Events(with_logprobs.StreamDelta(Delta("!", {Token('!', -1)})));
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0]["choices"][0]["text"], "Hi");
  EXPECT_EQ(events[0]["choices"][0]["logprobs"]["token_logprobs"], json::parse("[null, -2.0]"));
  EXPECT_EQ(events[1]["choices"][0]["logprobs"]["text_offset"], json::parse("[2]"));
}

TEST(OpenAiResponseTest, EndingsThatAreNotCompletions) {
  for (const auto reason : {engine::FinishReason::kCancelled, engine::FinishReason::kDeadline,
                            engine::FinishReason::kError}) {
    ResponseBuilder b(Info(ApiKind::kCompletion));
    engine::FinalResult result = Final(reason, 1, 1);
    result.error = absl::InternalError("boom");
    EXPECT_FALSE(b.Body(result).ok());
    // A stream already said 200: the end says why, and an error event follows.
    const std::vector<json> events = Events(b.StreamEnd(result));
    ASSERT_EQ(events.size(), 3u);
    EXPECT_EQ(events[0]["choices"][0]["finish_reason"], std::string(ApiFinishReason(reason)));
    EXPECT_TRUE(events[1].contains("error"));
    EXPECT_EQ(events[2], "[DONE]");
  }
  ResponseBuilder b(Info(ApiKind::kCompletion));
  EXPECT_THAT(b.Body(Final(engine::FinishReason::kCancelled, 1, 0)),
              StatusIs(absl::StatusCode::kUnavailable, "cancelled"));
  EXPECT_THAT(b.Body(Final(engine::FinishReason::kDeadline, 1, 0)),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST(OpenAiResponseTest, ErrorsHaveOpenAisShapeAndStatus) {
  const HttpError bad = ErrorResponse(absl::InvalidArgumentError("top_p: must be in (0, 1]"));
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(json::parse(bad.body), json::parse(R"({"error": {"message":
      "top_p: must be in (0, 1]", "type": "invalid_request_error", "param": "top_p",
      "code": null}})"));
  EXPECT_EQ(
      json::parse(ErrorResponse(absl::InvalidArgumentError("stop[2]: x")).body)["error"]["param"],
      "stop[2]");
  EXPECT_TRUE(
      json::parse(ErrorResponse(absl::InvalidArgumentError("no field here")).body)["error"]["param"]
          .is_null());
  EXPECT_EQ(ErrorResponse(absl::UnauthenticatedError("invalid credentials")).status, 401);
  EXPECT_EQ(ErrorResponse(absl::PermissionDeniedError("")).status, 403);
  EXPECT_EQ(ErrorResponse(absl::NotFoundError("")).status, 404);
  EXPECT_EQ(ErrorResponse(absl::AlreadyExistsError("")).status, 409);
  EXPECT_EQ(ErrorResponse(absl::ResourceExhaustedError("queue")).status, 429);
  EXPECT_EQ(ErrorResponse(absl::UnavailableError("draining")).status, 503);
  EXPECT_EQ(ErrorResponse(absl::DeadlineExceededError("")).status, 504);
  EXPECT_EQ(ErrorResponse(absl::InternalError("")).status, 500);
  EXPECT_EQ(ErrorResponse(absl::FailedPreconditionError("session busy")).status, 400);
}

TEST(OpenAiResponseTest, SmallEndpoints) {
  const json models = json::parse(ModelsJson("tiny", 5, 1024));
  EXPECT_EQ(models["object"], "list");
  EXPECT_EQ(models["data"][0]["id"], "tiny");
  EXPECT_EQ(models["data"][0]["object"], "model");
  EXPECT_EQ(models["data"][0]["max_model_len"], 1024);
  EXPECT_EQ(json::parse(TokenizeJson({104, 105}, 9)),
            json::parse(R"({"tokens": [104, 105], "count": 2, "max_model_len": 9})"));
  EXPECT_EQ(json::parse(DetokenizeJson("hi")), json::parse(R"({"prompt": "hi"})"));
}

}  // namespace
}  // namespace ps::http
