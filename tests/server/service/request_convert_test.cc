// GenerateRequest -> EngineRequest: every invalid field is INVALID_ARGUMENT naming its path,
// defaults fill unset fields, an unset seed is picked, text and token-id prompts both convert.
#include "server/service/request_convert.h"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps::service {
namespace {

namespace v1 = ::polysketch::v1;
using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::ElementsAre;

RequestLimits Limits() {
  RequestLimits limits;
  limits.vocab_size = 256;
  limits.max_context = 1000;
  limits.max_prompt_tokens = 100;
  limits.max_new_tokens_limit = 512;
  return limits;
}

v1::GenerateRequest Valid() {
  v1::GenerateRequest request;
  request.set_text("hello");
  return request;
}

TEST(RequestConvertTest, TextPromptAndDefaults) {
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest c,
                          ConvertGenerateRequest(Valid(), Limits(), [] { return uint64_t{42}; }));
  EXPECT_THAT(c.request.prompt, ElementsAre('h', 'e', 'l', 'l', 'o'));
  EXPECT_EQ(c.request.sampling.temperature, 1.0f);
  EXPECT_EQ(c.request.sampling.top_p, 1.0f);
  EXPECT_EQ(c.request.sampling.repetition_penalty, 1.0f);
  EXPECT_EQ(c.request.sampling.top_k, 0);
  EXPECT_EQ(c.request.stops.max_new_tokens, kDefaultMaxNewTokens);
  EXPECT_EQ(c.request.sampling.seed, 42u);
  EXPECT_TRUE(c.seed_picked);
  EXPECT_EQ(c.time_limit, absl::InfiniteDuration());
  EXPECT_TRUE(c.request.id.empty());
}

// max_new_tokens: unset is the default, an explicit 0 stays 0 (scoring only); the prompt
// log-probability fields pass through.
TEST(RequestConvertTest, ExplicitZeroMaxNewTokensAndPromptLogprobs) {
  v1::GenerateRequest request = Valid();
  request.set_max_new_tokens(0);
  request.set_prompt_logprobs(true);
  request.set_prompt_top_logprobs(20);
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest c, ConvertGenerateRequest(request, Limits()));
  EXPECT_EQ(c.request.stops.max_new_tokens, 0);
  EXPECT_TRUE(c.request.prompt_logprobs);
  EXPECT_EQ(c.request.prompt_top_logprobs, 20);
  request.clear_max_new_tokens();
  request.set_prompt_logprobs(false);
  request.set_prompt_top_logprobs(0);
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest d, ConvertGenerateRequest(request, Limits()));
  EXPECT_EQ(d.request.stops.max_new_tokens, kDefaultMaxNewTokens);
  EXPECT_FALSE(d.request.prompt_logprobs);
}

TEST(RequestConvertTest, SeedPickedWhenUnsetAndKeptWhenSet) {
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest a, ConvertGenerateRequest(Valid(), Limits()));
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest b, ConvertGenerateRequest(Valid(), Limits()));
  EXPECT_NE(a.request.sampling.seed, b.request.sampling.seed);  // 2^-64 chance of a false fail
  v1::GenerateRequest request = Valid();
  request.mutable_sampling()->set_seed(0);
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest c, ConvertGenerateRequest(request, Limits()));
  EXPECT_EQ(c.request.sampling.seed, 0u);
  EXPECT_FALSE(c.seed_picked);
}

TEST(RequestConvertTest, TokenIdsAndEveryField) {
  v1::GenerateRequest r;
  r.set_request_id("my-id");
  r.mutable_token_ids()->add_ids(0);
  r.mutable_token_ids()->add_ids(255);
  v1::SamplingParams* s = r.mutable_sampling();
  s->set_temperature(0);
  s->set_top_k(5);
  s->set_top_p(0.5f);
  s->set_min_p(0.1f);
  s->set_repetition_penalty(1.2f);
  s->set_presence_penalty(-1);
  s->set_frequency_penalty(2);
  s->set_seed(7);
  r.mutable_stop()->add_stop_strings("\n\n");
  r.mutable_stop()->add_stop_token_ids(10);
  r.mutable_stop()->set_include_stop_string(true);
  r.set_max_new_tokens(512);
  r.set_min_new_tokens(3);
  r.set_logprobs(true);
  r.set_top_logprobs(20);
  r.set_time_limit_ms(1500);
  r.set_cache_salt("tenant-7");
  PS_ASSERT_OK_AND_ASSIGN(ConvertedRequest c, ConvertGenerateRequest(r, Limits()));
  EXPECT_EQ(c.request.id, "my-id");
  EXPECT_EQ(c.request.prefix_cache_salt, "tenant-7");
  EXPECT_THAT(c.request.prompt, ElementsAre(0, 255));
  EXPECT_EQ(c.request.sampling.temperature, 0.0f);
  EXPECT_EQ(c.request.sampling.top_k, 5);
  EXPECT_EQ(c.request.sampling.top_p, 0.5f);
  EXPECT_EQ(c.request.sampling.min_p, 0.1f);
  EXPECT_EQ(c.request.sampling.repetition_penalty, 1.2f);
  EXPECT_EQ(c.request.sampling.presence_penalty, -1.0f);
  EXPECT_EQ(c.request.sampling.frequency_penalty, 2.0f);
  EXPECT_EQ(c.request.sampling.seed, 7u);
  EXPECT_TRUE(c.request.sampling.logprobs);
  EXPECT_EQ(c.request.sampling.top_logprobs, 20);
  EXPECT_THAT(c.request.stops.stop_strings, ElementsAre("\n\n"));
  EXPECT_THAT(c.request.stops.stop_token_ids, ElementsAre(10));
  EXPECT_TRUE(c.request.stops.include_stop_string);
  EXPECT_EQ(c.request.stops.max_new_tokens, 512);
  EXPECT_EQ(c.request.stops.min_new_tokens, 3);
  EXPECT_EQ(c.time_limit, absl::Milliseconds(1500));
}

struct InvalidCase {
  std::string name;
  std::string message;  // expected substring, starting with the field path
  std::function<void(v1::GenerateRequest&)> mutate;
};

class InvalidFieldTest : public ::testing::TestWithParam<InvalidCase> {};

TEST_P(InvalidFieldTest, IsInvalidArgumentNamingTheField) {
  v1::GenerateRequest request = Valid();
  GetParam().mutate(request);
  EXPECT_THAT(ConvertGenerateRequest(request, Limits()),
              StatusIs(absl::StatusCode::kInvalidArgument, GetParam().message));
}

// GCC 12 reports a false -Wrestrict inside std::string for the inlined lambdas below (GCC bug
// 105329). Clang has no such warning (and -Werror refuses an unknown one).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wrestrict"
#endif
using R = v1::GenerateRequest;
INSTANTIATE_TEST_SUITE_P(
    AllFields, InvalidFieldTest,
    ::testing::ValuesIn(std::vector<InvalidCase>{
        {"NoPrompt", "prompt: give text or token_ids", [](R& r) { r.clear_prompt(); }},
        {"EmptyText", "prompt: must not be empty", [](R& r) { r.set_text(""); }},
        {"EmptyIds", "prompt: must not be empty", [](R& r) { r.mutable_token_ids(); }},
        {"BadUtf8", "prompt.text: not valid UTF-8 at byte 2",
         [](R& r) { r.set_text(std::string("ab\xC3(", 4)); }},
        {"Surrogate", "prompt.text: not valid UTF-8 at byte 0",
         [](R& r) { r.set_text("\xED\xA0\x80"); }},
        {"TokenIdHigh", "prompt.token_ids[1]: must be in [0, 256), got 256",
         [](R& r) {
           r.mutable_token_ids()->add_ids(1);
           r.mutable_token_ids()->add_ids(256);
         }},
        {"TokenIdNegative", "prompt.token_ids[0]: must be in [0, 256), got -1",
         [](R& r) { r.mutable_token_ids()->add_ids(-1); }},
        {"PromptTooLong", "prompt: must have at most 100 tokens",
         [](R& r) { r.set_text(std::string(101, 'a')); }},
        {"Temperature", "sampling.temperature: must be in [0, 100], got 101",
         [](R& r) { r.mutable_sampling()->set_temperature(101); }},
        {"TemperatureNan", "sampling.temperature: must be in [0, 100], got nan",
         [](R& r) { r.mutable_sampling()->set_temperature(std::nanf("")); }},
        {"TopK", "sampling.top_k: must be in [0, 256], got 257",
         [](R& r) { r.mutable_sampling()->set_top_k(257); }},
        {"TopP", "sampling.top_p: must be in (0, 1], got 0",
         [](R& r) { r.mutable_sampling()->set_top_p(0); }},
        {"MinP", "sampling.min_p: must be in [0, 1], got -0.5",
         [](R& r) { r.mutable_sampling()->set_min_p(-0.5f); }},
        {"RepetitionPenalty", "sampling.repetition_penalty: must be in (0, 10], got 11",
         [](R& r) { r.mutable_sampling()->set_repetition_penalty(11); }},
        {"PresencePenalty", "sampling.presence_penalty: must be in [-2, 2], got 2.5",
         [](R& r) { r.mutable_sampling()->set_presence_penalty(2.5f); }},
        {"FrequencyPenalty", "sampling.frequency_penalty: must be in [-2, 2], got -2.5",
         [](R& r) { r.mutable_sampling()->set_frequency_penalty(-2.5f); }},
        {"MaxNewTokens", "max_new_tokens: must be in [0, 512] (unset: default 256), got 513",
         [](R& r) { r.set_max_new_tokens(513); }},
        {"MinNewTokens", "min_new_tokens: must be in [0, max_new_tokens = 10], got 11",
         [](R& r) {
           r.set_max_new_tokens(10);
           r.set_min_new_tokens(11);
         }},
        {"MinNewTokensDefault", "min_new_tokens: must be in [0, max_new_tokens = 256]",
         [](R& r) { r.set_min_new_tokens(257); }},
        {"TopLogprobs", "top_logprobs: must be in [0, 20], got 21",
         [](R& r) {
           r.set_logprobs(true);
           r.set_top_logprobs(21);
         }},
        {"TopLogprobsWithoutLogprobs", "top_logprobs: must be 0 unless logprobs is set",
         [](R& r) { r.set_top_logprobs(1); }},
        {"PromptTopLogprobs", "prompt_top_logprobs: must be in [0, 20], got 21",
         [](R& r) {
           r.set_prompt_logprobs(true);
           r.set_prompt_top_logprobs(21);
         }},
        {"PromptTopLogprobsWithoutPromptLogprobs",
         "prompt_top_logprobs: must be 0 unless prompt_logprobs is set, got 3",
         [](R& r) { r.set_prompt_top_logprobs(3); }},
        {"PromptLogprobsWithSession",
         "prompt_logprobs: not available with session_id: a session turn's earlier tokens are "
         "not re-scored",
         [](R& r) {
           r.set_prompt_logprobs(true);
           r.set_session_id("s1");
         }},
        {"MinNewTokensAboveZero", "min_new_tokens: must be in [0, max_new_tokens = 0], got 1",
         [](R& r) {
           r.set_max_new_tokens(0);
           r.set_min_new_tokens(1);
         }},
        {"RequestIdLong", "request_id: must be at most 128 bytes, got 129 bytes",
         [](R& r) { r.set_request_id(std::string(129, 'a')); }},
        {"RequestIdControl", "request_id: must be printable ASCII",
         [](R& r) { r.set_request_id("a\tb"); }},
        {"RequestIdNonAscii", "request_id: must be printable ASCII",
         [](R& r) { r.set_request_id("\xC3\xA9"); }},
        {"TooManyStopStrings", "stop.stop_strings: must have at most 16 entries, got 17",
         [](R& r) {
           for (int i = 0; i < 17; ++i) r.mutable_stop()->add_stop_strings("x");
         }},
        {"EmptyStopString", "stop.stop_strings[0]: must have 1..256 bytes, got 0 bytes",
         [](R& r) { r.mutable_stop()->add_stop_strings(""); }},
        {"LongStopString", "stop.stop_strings[1]: must have 1..256 bytes, got 257 bytes",
         [](R& r) {
           r.mutable_stop()->add_stop_strings("ok");
           r.mutable_stop()->add_stop_strings(std::string(257, 'a'));
         }},
        {"BadUtf8StopString", "stop.stop_strings[0]: not valid UTF-8 at byte 1",
         [](R& r) { r.mutable_stop()->add_stop_strings("a\xFF"); }},
        {"TooManyStopTokens", "stop.stop_token_ids: must have at most 64 entries, got 65",
         [](R& r) {
           for (int i = 0; i < 65; ++i) r.mutable_stop()->add_stop_token_ids(1);
         }},
        {"StopTokenOutside", "stop.stop_token_ids[0]: must be in [0, 256), got 300",
         [](R& r) { r.mutable_stop()->add_stop_token_ids(300); }},
        {"CacheSaltLong", "cache_salt: must be at most 256 bytes, got 257 bytes",
         [](R& r) { r.set_cache_salt(std::string(257, 's')); }},
    }),
    [](const ::testing::TestParamInfo<InvalidCase>& param_info) { return param_info.param.name; });
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

TEST(RequestConvertTest, PromptMustFitTheContext) {
  RequestLimits limits = Limits();
  limits.max_context = 4;
  v1::GenerateRequest request = Valid();  // 5 tokens
  EXPECT_THAT(ConvertGenerateRequest(request, limits),
              StatusIs(absl::StatusCode::kInvalidArgument, "at most 4 (the context limit)"));
  request.set_text("abcd");
  EXPECT_THAT(ConvertGenerateRequest(request, limits), IsOk());
}

TEST(RequestConvertTest, FirstInvalidUtf8Byte) {
  EXPECT_EQ(FirstInvalidUtf8Byte(""), -1);
  EXPECT_EQ(FirstInvalidUtf8Byte("h\xC3\xA9 \xF0\x9F\x98\x80"), -1);
  EXPECT_EQ(FirstInvalidUtf8Byte(std::string("a\0b", 3)), -1);
  EXPECT_EQ(FirstInvalidUtf8Byte("\xC0\x80"), 0);            // overlong
  EXPECT_EQ(FirstInvalidUtf8Byte("ab\xF4\x90\x80\x80"), 2);  // past U+10FFFF
  EXPECT_EQ(FirstInvalidUtf8Byte("abc\xE2\x82"), 3);         // truncated
  EXPECT_EQ(FirstInvalidUtf8Byte("\x80"), 0);                // stray continuation
}

TEST(RequestConvertTest, ModelInfoFromConfig) {
  engine::ModelConfig config;
  config.vocab_size = 256;
  config.d_model = 64;
  config.n_layers = 2;
  config.n_heads = 4;
  config.d_ff = 168;
  config.max_seq_len = 512;
  config.layers.resize(2);
  config.layers[1].kind = engine::AttentionKind::kPolysketch;
  ModelInfoExtras extras;
  extras.name = "tiny";
  extras.device = "cpu";
  extras.state_bytes_per_request = 12345;
  extras.limits = Limits();
  extras.state_slots = 8;
  extras.max_waiting = 256;
  extras.max_waiting_tokens = 1000;
  const v1::ModelInfo info = BuildModelInfo(config, extras);
  EXPECT_EQ(info.name(), "tiny");
  EXPECT_THAT(info.attention_kinds(), ElementsAre("softmax", "polysketch"));
  EXPECT_EQ(info.d_ff(), 168u);
  EXPECT_EQ(info.state_bytes_per_request(), 12345u);
  EXPECT_EQ(info.limits().max_context(), 1000u);
  EXPECT_EQ(info.limits().max_prompt_tokens(), 100u);
  EXPECT_EQ(info.limits().max_new_tokens(), 512u);
  EXPECT_EQ(info.limits().state_slots(), 8u);
  EXPECT_EQ(info.limits().max_waiting_tokens(), 1000u);
}

}  // namespace
}  // namespace ps::service
