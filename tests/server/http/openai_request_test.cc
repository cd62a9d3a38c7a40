// OpenAI request bodies -> GenerateRequest: each field's forms and types, the refusals (each
// naming the field), and the renaming of the gRPC side's messages to the request's field names.
// The values then pass the gRPC side's ConvertGenerateRequest, as the server does.
#include "server/http/openai_request.h"

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/service/request_convert.h"
#include "tests/testing/status_matchers.h"

namespace ps::http {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

absl::StatusOr<ApiRequest> Completion(const std::string& body) {
  return ParseApiRequest(body, ApiKind::kCompletion, DefaultChatTemplate());
}
absl::StatusOr<ApiRequest> Chat(const std::string& body) {
  return ParseApiRequest(body, ApiKind::kChat, DefaultChatTemplate());
}

// The gRPC side's validation of a parsed request, with its messages renamed as the server does.
absl::Status Convert(const ApiRequest& request) {
  service::RequestLimits limits;
  limits.vocab_size = 256;
  limits.max_context = 1000;
  limits.max_prompt_tokens = 100;
  limits.max_new_tokens_limit = 512;
  return RenameProtoField(service::ConvertGenerateRequest(request.proto, limits).status(),
                          request.kind);
}

TEST(OpenAiRequestTest, CompletionDefaults) {
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest r, Completion(R"({"model": "m", "prompt": "And God"})"));
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.proto.text(), "And God");
  // OpenAI's completions default: 16 tokens.
  EXPECT_EQ(r.proto.max_new_tokens(), kDefaultCompletionMaxTokens);
  EXPECT_FALSE(r.proto.sampling().has_temperature());
  EXPECT_FALSE(r.proto.sampling().has_seed());
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.echo);
  EXPECT_EQ(r.logprobs, -1);
  EXPECT_FALSE(r.proto.logprobs());
  EXPECT_THAT(Convert(r), IsOk());
}

TEST(OpenAiRequestTest, EverySamplingFieldReachesTheProto) {
  PS_ASSERT_OK_AND_ASSIGN(
      ApiRequest r, Completion(R"({"prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                     "top_k": 40, "min_p": 0.05, "presence_penalty": 0.1,
                     "frequency_penalty": -0.2, "repetition_penalty": 1.3, "seed": 12345,
                     "stop": ["\n\n", "END"], "stop_token_ids": [10], "min_tokens": 2,
                     "include_stop_str_in_output": true, "ignore_eos": true, "user": "u1",
                     "stream": true, "stream_options": {"include_usage": true},
                     "session_id": "s-1", "cache_salt": "team-a", "n": 1, "best_of": 1,
                     "logit_bias": {},
                     "suffix": null, "response_format": {"type": "text"}})"));
  const auto& s = r.proto.sampling();
  EXPECT_EQ(r.proto.max_new_tokens(), 7u);
  EXPECT_FLOAT_EQ(s.temperature(), 0.5f);
  EXPECT_FLOAT_EQ(s.top_p(), 0.9f);
  EXPECT_EQ(s.top_k(), 40);
  EXPECT_FLOAT_EQ(s.min_p(), 0.05f);
  EXPECT_FLOAT_EQ(s.presence_penalty(), 0.1f);
  EXPECT_FLOAT_EQ(s.frequency_penalty(), -0.2f);
  EXPECT_FLOAT_EQ(s.repetition_penalty(), 1.3f);
  EXPECT_EQ(s.seed(), 12345u);
  EXPECT_THAT(r.proto.stop().stop_strings(), ElementsAre("\n\n", "END"));
  EXPECT_THAT(r.proto.stop().stop_token_ids(), ElementsAre(10));
  EXPECT_TRUE(r.proto.stop().include_stop_string());
  EXPECT_TRUE(r.proto.stop().ignore_eos());
  EXPECT_EQ(r.proto.min_new_tokens(), 2u);
  EXPECT_EQ(r.user, "u1");
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.proto.session_id(), "s-1");
  EXPECT_EQ(r.proto.cache_salt(), "team-a");
  EXPECT_THAT(Convert(r), IsOk());
}

TEST(OpenAiRequestTest, PromptForms) {
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest ids, Completion(R"({"prompt": [65, 110, 100]})"));
  EXPECT_THAT(ids.proto.token_ids().ids(), ElementsAre(65, 110, 100));
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest one_text, Completion(R"({"prompt": ["And"]})"));
  EXPECT_EQ(one_text.proto.text(), "And");
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest one_ids, Completion(R"({"prompt": [[1, 2]]})"));
  EXPECT_THAT(one_ids.proto.token_ids().ids(), ElementsAre(1, 2));
  EXPECT_THAT(Completion(R"({"prompt": ["a", "b"]})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt: one prompt per request"));
  EXPECT_THAT(Completion(R"({"prompt": 5})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt: must be a string"));
  EXPECT_THAT(Completion(R"({"prompt": []})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt: must not be empty"));
  EXPECT_THAT(Completion(R"({"prompt": [1, 3000000000]})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt[1]: must be an integer"));
  EXPECT_THAT(Completion(R"({"max_tokens": 3})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt: required"));
  // Outside the vocabulary: the gRPC side's check, renamed.
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest big, Completion(R"({"prompt": [1, 300]})"));
  EXPECT_THAT(Convert(big), StatusIs(absl::StatusCode::kInvalidArgument,
                                     "prompt[1]: must be in [0, 256), got 300"));
}

TEST(OpenAiRequestTest, WrongTypesNameTheField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"prompt": "x", "temperature": "hot"})", "temperature: must be a number"},
      {R"({"prompt": "x", "max_tokens": 1.5})", "max_tokens: must be an integer"},
      {R"({"prompt": "x", "max_tokens": -1})", "max_tokens: must be an integer in [0,"},
      {R"({"prompt": "x", "top_k": "all"})", "top_k: must be an integer"},
      {R"({"prompt": "x", "seed": -3})", "seed: must be an integer in [0, 2^64)"},
      {R"({"prompt": "x", "stream": "yes"})", "stream: must be true or false"},
      {R"({"prompt": "x", "echo": 1})", "echo: must be true or false"},
      {R"({"prompt": "x", "stop": 3})", "stop: must be a string or a list of strings"},
      {R"({"prompt": "x", "stop": ["a", 2]})", "stop[1]: must be a string"},
      {R"({"prompt": "x", "stop_token_ids": [1, "b"]})", "stop_token_ids[1]: must be"},
      {R"({"prompt": "x", "model": 7})", "model: must be a string"},
      {R"({"prompt": "x", "cache_salt": 7})", "cache_salt: must be a string"},
      {R"({"prompt": "x", "logprobs": 21})", "logprobs: must be an integer in [0, 20]"},
      {R"({"prompt": "x", "n": 2})", "n: must be an integer in [1, 1]"},
      {R"({"prompt": "x", "best_of": 3})", "best_of: must be an integer in [1, 1]"},
      {R"({"prompt": "x", "suffix": "tail"})", "suffix: is not supported"},
      {R"({"prompt": "x", "logit_bias": {"50": 1}})", "logit_bias: is not supported"},
      {R"({"prompt": "x", "response_format": {"type": "json_object"}})", "response_format:"},
      {R"({"prompt": "x", "stream_options": {"include_usage": true}})",
       "stream_options: only allowed with \"stream\": true"},
      {R"({"prompt": "x", "stream": true, "stream_options": []})",
       "stream_options: must be an object"},
  };
  for (const auto& [body, message] : cases) {
    EXPECT_THAT(Completion(body), StatusIs(absl::StatusCode::kInvalidArgument, message)) << body;
  }
}

TEST(OpenAiRequestTest, MalformedBodies) {
  EXPECT_THAT(Completion(""), StatusIs(absl::StatusCode::kInvalidArgument, "body: empty"));
  EXPECT_THAT(Completion(R"({"prompt": "x",)"),
              StatusIs(absl::StatusCode::kInvalidArgument, "body: not valid JSON"));
  EXPECT_THAT(Completion(R"(["prompt"])"),
              StatusIs(absl::StatusCode::kInvalidArgument, "body: must be a JSON object"));
  EXPECT_THAT(Completion(R"({"prompt": "x", "prompt": "y"})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "duplicate key"));
  EXPECT_THAT(Completion("{\"prompt\": \"\xff\"}"),
              StatusIs(absl::StatusCode::kInvalidArgument, "body: not valid JSON"));
  // Deep nesting is refused before a tree is built; brackets inside strings do not count.
  EXPECT_THAT(Completion(std::string(100000, '[')),
              StatusIs(absl::StatusCode::kInvalidArgument, "nested deeper than 16"));
  EXPECT_THAT(Completion(R"({"prompt": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"[[[[[[["})"), IsOk());
  // Unknown fields are ignored; null means unset.
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest r,
                          Completion(R"({"prompt": "x", "frobnicate": [1], "temperature": null})"));
  EXPECT_FALSE(r.proto.sampling().has_temperature());
}

TEST(OpenAiRequestTest, RangesComeFromTheGrpcSideRenamed) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"prompt": "x", "top_p": 0})", "top_p: must be in (0, 1], got 0"},
      {R"({"prompt": "x", "temperature": 101})", "temperature: must be in [0, 100]"},
      {R"({"prompt": "x", "max_tokens": 100000})", "max_tokens: must be in [0, 512]"},
      {R"({"prompt": "x", "min_tokens": 20, "max_tokens": 10})", "min_tokens: must be in"},
      {R"({"prompt": "x", "stop": [""]})", "stop[0]: must have 1..256 bytes"},
      {R"({"prompt": "x", "stop_token_ids": [999]})", "stop_token_ids[0]: must be in [0, 256)"},
      {R"({"prompt": ""})", "prompt: must not be empty"},
      {R"({"prompt": "x", "session_id": "bad\nid"})", "session_id: must be printable ASCII"},
      {R"({"prompt": "x", "echo": true, "logprobs": 2, "session_id": "s"})", "echo: not avail"},
  };
  for (const auto& [body, message] : cases) {
    PS_ASSERT_OK_AND_ASSIGN(ApiRequest r, Completion(body));
    EXPECT_THAT(Convert(r), StatusIs(absl::StatusCode::kInvalidArgument, message)) << body;
  }
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest chat, Chat(R"({"messages": [{"role": "user", "content": "hi"}],
                                   "logprobs": true, "top_logprobs": 20, "top_p": 2})"));
  EXPECT_THAT(Convert(chat), StatusIs(absl::StatusCode::kInvalidArgument, "top_p: must be in"));
}

TEST(OpenAiRequestTest, LogprobsAndEcho) {
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest r,
                          Completion(R"({"prompt": "x", "logprobs": 3, "echo": true})"));
  EXPECT_EQ(r.logprobs, 3);
  EXPECT_TRUE(r.echo);
  EXPECT_TRUE(r.proto.logprobs());
  EXPECT_EQ(r.proto.top_logprobs(), 3u);
  // Echoed prompt tokens come with their log-probabilities (the gRPC API's prompt_logprobs).
  EXPECT_TRUE(r.proto.prompt_logprobs());
  EXPECT_EQ(r.proto.prompt_top_logprobs(), 3u);
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest plain, Completion(R"({"prompt": "x", "echo": true})"));
  EXPECT_FALSE(plain.proto.prompt_logprobs());
  // Chat: a boolean plus top_logprobs.
  PS_ASSERT_OK_AND_ASSIGN(
      ApiRequest chat, Chat(R"({"messages": [{"role": "user", "content": "hi"}], "logprobs": true,
               "top_logprobs": 2})"));
  EXPECT_EQ(chat.logprobs, 2);
  EXPECT_THAT(Chat(R"({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "top_logprobs: needs"));
}

TEST(OpenAiRequestTest, ChatRendersTheTemplateAndAddsItsStops) {
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest r,
                          Chat(R"({"messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "Who "},
                                                         {"type": "text", "text": "spoke?"}]},
                            {"role": "assistant", "content": "God."},
                            {"role": "user", "content": "When?"}],
               "stop": "."})"));
  EXPECT_EQ(r.proto.text(),
            "Be brief.\n\nUser: Who spoke?\nAssistant: God.\nUser: When?\nAssistant:");
  EXPECT_THAT(r.proto.stop().stop_strings(), ElementsAre(".", "\nUser:"));
  // No max_tokens: the gRPC API's default (unset).
  EXPECT_FALSE(r.proto.has_max_new_tokens());
  PS_ASSERT_OK_AND_ASSIGN(ApiRequest newer, Chat(R"({"messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 5, "max_completion_tokens": 9})"));
  EXPECT_EQ(newer.proto.max_new_tokens(), 9u);
  const std::pair<const char*, const char*> cases[] = {
      {R"({"messages": []})", "messages: must be a non-empty list"},
      {R"({"prompt": "x"})", "messages: required"},
      {R"({"messages": ["hi"]})", "messages[0]: must be an object"},
      {R"({"messages": [{"content": "hi"}]})", "messages[0].role: must be a string"},
      {R"({"messages": [{"role": "tool", "content": "hi"}]})", "messages[0].role: must be one of"},
      {R"({"messages": [{"role": "user"}]})", "messages[0].content: required"},
      {R"({"messages": [{"role": "user", "content": 3}]})", "messages[0].content: must be"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0].type: only \"text\" parts"},
      {R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})",
       "tools: is not supported"},
  };
  for (const auto& [body, message] : cases) {
    EXPECT_THAT(Chat(body), StatusIs(absl::StatusCode::kInvalidArgument, message)) << body;
  }
  // An assistant message may have null content (a turn that only called tools elsewhere).
  EXPECT_THAT(Chat(R"({"messages": [{"role": "assistant", "content": null}]})"), IsOk());
}

TEST(OpenAiRequestTest, TokenizeAndDetokenize) {
  std::string model;
  PS_ASSERT_OK_AND_ASSIGN(
      std::string text,
      ParseTokenizeRequest(R"({"model": "m", "prompt": "ab"})", DefaultChatTemplate(), &model));
  EXPECT_EQ(text, "ab");
  EXPECT_EQ(model, "m");
  PS_ASSERT_OK_AND_ASSIGN(
      std::string chat, ParseTokenizeRequest(R"({"messages": [{"role": "user", "content": "hi"}]})",
                                             DefaultChatTemplate(), &model));
  EXPECT_EQ(chat, "User: hi\nAssistant:");
  EXPECT_THAT(ParseTokenizeRequest("{}", DefaultChatTemplate(), &model),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt: required"));
  PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> ids,
                          ParseDetokenizeRequest(R"({"tokens": [104, 105]})", 256, &model));
  EXPECT_THAT(ids, ElementsAre(104, 105));
  EXPECT_THAT(ParseDetokenizeRequest(R"({"tokens": [1, 256]})", 256, &model),
              StatusIs(absl::StatusCode::kInvalidArgument, "tokens[1]: must be an integer in"));
  EXPECT_THAT(ParseDetokenizeRequest(R"({"tokens": "hi"})", 256, &model),
              StatusIs(absl::StatusCode::kInvalidArgument, "tokens: must be a list"));
}

TEST(OpenAiRequestTest, RenameLeavesOtherMessagesAlone) {
  const absl::Status queue = absl::ResourceExhaustedError("sampling.x: queue full");
  EXPECT_EQ(RenameProtoField(queue, ApiKind::kCompletion), queue);
  const absl::Status prose = absl::InvalidArgumentError("the prompt is: long");
  EXPECT_EQ(RenameProtoField(prose, ApiKind::kCompletion), prose);
  EXPECT_THAT(RenameProtoField(absl::InvalidArgumentError("prompt.text: not valid UTF-8 at byte 3"),
                               ApiKind::kChat),
              StatusIs(absl::StatusCode::kInvalidArgument, "messages: not valid UTF-8"));
  EXPECT_THAT(RenameProtoField(absl::InvalidArgumentError("top_logprobs: must be in [0, 20]"),
                               ApiKind::kCompletion),
              StatusIs(absl::StatusCode::kInvalidArgument, "logprobs: must be in"));
}

}  // namespace
}  // namespace ps::http
