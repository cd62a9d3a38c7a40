// Sampler and SamplingParams: validation of every field (garbage, NaN, inf), greedy ties,
// seeded reproducibility, exactly which tokens top-k / top-p / min-p leave (5000 seeded draws,
// plus a wide frequency bound), penalties against their formulas, and logprobs against a
// log_softmax computed here in double.
#include "server/engine/serving/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::HasSubstr;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Logits whose softmax is exactly `probs` (log of each; 0 -> -inf).
std::vector<float> LogitsOf(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(p > 0 ? static_cast<float>(std::log(p)) : -kInf);
  return logits;
}

Sampler MakeSampler(const SamplingParams& params, int64_t vocab_size,
                    std::vector<int32_t> prompt = {}) {
  absl::StatusOr<Sampler> sampler = Sampler::Create(params, vocab_size, prompt);
  EXPECT_THAT(sampler, IsOk());
  return *std::move(sampler);
}

// Token -> how many of `num_draws` seeded draws chose it.
std::map<int32_t, int> Histogram(const SamplingParams& params, const std::vector<float>& logits,
                                 int num_draws = 5000) {
  Sampler sampler = MakeSampler(params, static_cast<int64_t>(logits.size()));
  std::map<int32_t, int> counts;
  for (int i = 0; i < num_draws; ++i) {
    absl::StatusOr<SampleResult> result = sampler.Sample(logits);
    EXPECT_THAT(result, IsOk());
    if (!result.ok()) break;
    ++counts[result->token_id];
  }
  return counts;
}

std::set<int32_t> Keys(const std::map<int32_t, int>& counts) {
  std::set<int32_t> keys;
  for (const auto& [id, count] : counts) keys.insert(id);
  return keys;
}

// ---- Validation ------------------------------------------------------------------------------

struct BadParam {
  std::string field;
  SamplingParams params;
};

std::vector<BadParam> BadParams() {
  std::vector<BadParam> bad;
  const auto add = [&bad](const std::string& field, auto set, std::vector<double> values) {
    for (double value : values) {
      SamplingParams params;
      set(params, value);
      bad.push_back({field, params});
    }
  };
  const std::vector<double> non_finite = {std::nan(""), INFINITY, -INFINITY};
  const auto with = [](std::vector<double> a, const std::vector<double>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  add(
      "temperature", [](SamplingParams& p, double v) { p.temperature = static_cast<float>(v); },
      with({-0.5, -1e-9, 100.5, 1e30}, non_finite));
  add("top_k", [](SamplingParams& p, double v) { p.top_k = static_cast<int32_t>(v); },
      {-1, 11, 1000000});
  add(
      "top_p", [](SamplingParams& p, double v) { p.top_p = static_cast<float>(v); },
      with({0, -0.1, 1.01}, non_finite));
  add(
      "min_p", [](SamplingParams& p, double v) { p.min_p = static_cast<float>(v); },
      with({-0.01, 1.5}, non_finite));
  add(
      "repetition_penalty",
      [](SamplingParams& p, double v) { p.repetition_penalty = static_cast<float>(v); },
      with({0, -1, 10.5}, non_finite));
  add(
      "presence_penalty",
      [](SamplingParams& p, double v) { p.presence_penalty = static_cast<float>(v); },
      with({-2.5, 2.01}, non_finite));
  add(
      "frequency_penalty",
      [](SamplingParams& p, double v) { p.frequency_penalty = static_cast<float>(v); },
      with({-2.01, 3}, non_finite));
  add("top_logprobs", [](SamplingParams& p, double v) { p.top_logprobs = static_cast<int32_t>(v); },
      {-1, 21});
  return bad;
}

TEST(SamplingParamsTest, DefaultsAndBoundariesAreValid) {
  EXPECT_THAT(SamplingParams().Validate(10), IsOk());
  SamplingParams low;
  low.temperature = 0;
  low.top_k = 0;
  low.top_p = 1e-6f;
  low.min_p = 0;
  low.repetition_penalty = 1e-6f;
  low.presence_penalty = -2;
  low.frequency_penalty = -2;
  low.top_logprobs = 0;
  EXPECT_THAT(low.Validate(10), IsOk());
  SamplingParams high;
  high.temperature = 100;
  high.top_k = 10;
  high.top_p = 1;
  high.min_p = 1;
  high.repetition_penalty = 10;
  high.presence_penalty = 2;
  high.frequency_penalty = 2;
  high.top_logprobs = 20;
  EXPECT_THAT(high.Validate(10), IsOk());
}

TEST(SamplingParamsTest, EveryBadValueIsInvalidArgumentNamingTheField) {
  for (const BadParam& bad : BadParams()) {
    const absl::Status status = bad.params.Validate(10);
    EXPECT_THAT(status, StatusIs(kInvalid, bad.field + " = ")) << bad.field;
    EXPECT_THAT(status.message(), HasSubstr("outside")) << status;
    // Create reports the same error.
    EXPECT_THAT(Sampler::Create(bad.params, 10, {}), StatusIs(kInvalid, bad.field)) << bad.field;
  }
}

TEST(SamplingParamsTest, BadVocabSizeAndPromptIds) {
  EXPECT_THAT(SamplingParams().Validate(0), StatusIs(kInvalid, "vocab_size"));
  EXPECT_THAT(Sampler::Create(SamplingParams(), 10, std::vector<int32_t>{1, 10}),
              StatusIs(kInvalid, "prompt_ids[1] = 10"));
  EXPECT_THAT(Sampler::Create(SamplingParams(), 10, std::vector<int32_t>{-1}),
              StatusIs(kInvalid, "prompt_ids[0] = -1"));
  Sampler sampler = MakeSampler(SamplingParams(), 10);
  EXPECT_THAT(sampler.Accept(10), StatusIs(kInvalid, "token_id = 10"));
  EXPECT_THAT(sampler.Sample(std::vector<float>(9, 0.0f)), StatusIs(kInvalid, "vocab_size = 10"));
}

// ---- Broken logits ---------------------------------------------------------------------------

TEST(SamplerTest, NanOrPositiveInfinityLogitsAreInternalErrors) {
  for (float temperature : {0.0f, 1.0f}) {
    SamplingParams params;
    params.temperature = temperature;
    Sampler sampler = MakeSampler(params, 4);
    EXPECT_THAT(sampler.Sample(std::vector<float>{0, kNan, 1, 2}),
                StatusIs(absl::StatusCode::kInternal, "logits[1]"));
    EXPECT_THAT(sampler.Sample(std::vector<float>{0, 1, 2, kInf}),
                StatusIs(absl::StatusCode::kInternal, "logits[3]"));
    EXPECT_THAT(sampler.Sample(std::vector<float>(4, -kInf)),
                StatusIs(absl::StatusCode::kInternal, "every logit"));
  }
}

TEST(SamplerTest, NegativeInfinityTokensAreNeverChosen) {
  const std::vector<float> logits = {-kInf, 0.0f, -kInf, 0.0f, -kInf};
  EXPECT_EQ(Keys(Histogram(SamplingParams(), logits, 2000)), (std::set<int32_t>{1, 3}));
}

// ---- Greedy ----------------------------------------------------------------------------------

TEST(SamplerTest, GreedyIsArgmaxWithTiesToLowestId) {
  SamplingParams params;
  params.temperature = 0;
  Sampler sampler = MakeSampler(params, 6);
  PS_ASSERT_OK_AND_ASSIGN(SampleResult a, sampler.Sample(std::vector<float>{1, 5, 2, 7, 3, 0}));
  EXPECT_EQ(a.token_id, 3);
  PS_ASSERT_OK_AND_ASSIGN(SampleResult b, sampler.Sample(std::vector<float>{1, 7, 2, 7, 3, 7}));
  EXPECT_EQ(b.token_id, 1);
  PS_ASSERT_OK_AND_ASSIGN(SampleResult c, sampler.Sample(std::vector<float>(6, -3.0f)));
  EXPECT_EQ(c.token_id, 0);
}

TEST(SamplerTest, TopKOneIsGreedyAtAnyTemperature) {
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int> small(0, 3);  // few distinct values -> many ties
  for (float temperature : {0.05f, 1.0f, 100.0f}) {
    SamplingParams params;
    params.temperature = temperature;
    params.top_k = 1;
    params.seed = 3;
    Sampler sampler = MakeSampler(params, 33);
    for (int step = 0; step < 50; ++step) {
      std::vector<float> logits(33);
      for (float& logit : logits) logit = static_cast<float>(small(rng));
      int32_t argmax = 0;
      for (int32_t id = 1; id < 33; ++id) {
        if (logits[id] > logits[argmax]) argmax = id;
      }
      PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(logits));
      EXPECT_EQ(result.token_id, argmax) << "temperature " << temperature << " step " << step;
    }
  }
}

// ---- Reproducibility -------------------------------------------------------------------------

std::vector<int32_t> SampleRun(uint64_t seed, int num_steps) {
  SamplingParams params;
  params.seed = seed;
  params.temperature = 0.9f;
  params.top_p = 0.95f;
  params.presence_penalty = 0.3f;
  Sampler sampler = MakeSampler(params, 50);
  std::vector<float> logits(50);
  for (int32_t id = 0; id < 50; ++id) logits[id] = static_cast<float>(std::sin(id) * 2.0);
  std::vector<int32_t> tokens;
  for (int step = 0; step < num_steps; ++step) {
    absl::StatusOr<SampleResult> result = sampler.Sample(logits);
    EXPECT_THAT(result, IsOk());
    if (!result.ok()) break;
    tokens.push_back(result->token_id);
    EXPECT_THAT(sampler.Accept(result->token_id), IsOk());
  }
  return tokens;
}

TEST(SamplerTest, SameSeedSameSequenceDifferentSeedDiffers) {
  const std::vector<int32_t> a = SampleRun(1234, 200);
  EXPECT_EQ(a, SampleRun(1234, 200));
  EXPECT_NE(a, SampleRun(1235, 200));
  EXPECT_NE(SampleRun(0, 200), SampleRun(1, 200));
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 5u);  // it is really sampling
}

TEST(SamplerTest, SeededDrawIsPortable) {
  // mt19937_64's 10000th output is fixed by the standard ([rand.predef]); the draw derives from
  // its raw outputs only, so this pins the generator the sampler uses.
  std::mt19937_64 rng(5489u);
  rng.discard(9999);
  EXPECT_EQ(rng(), 9981545732273789042ull);
}

// ---- Truncation ------------------------------------------------------------------------------

TEST(SamplerTest, TopKKeepsExactlyTheKBest) {
  SamplingParams params;
  params.top_k = 2;
  params.seed = 11;
  // Probabilities 0.05, 0.25, 0.1, 0.25(tie with 1), 0.35: top-2 = {4, 1} (1 beats 3 on id).
  const auto counts = Histogram(params, LogitsOf({0.05, 0.25, 0.1, 0.25, 0.35}));
  EXPECT_EQ(Keys(counts), (std::set<int32_t>{1, 4}));
}

TEST(SamplerTest, TopPKeepsTheSmallestPrefixReachingP) {
  SamplingParams params;
  params.top_p = 0.8f;
  params.seed = 12;
  // Sorted 0.5 (id 2), 0.25 (id 0), 0.15 (id 3), 0.1 (id 1): 0.5 + 0.25 < 0.8, so id 3 stays.
  const auto counts = Histogram(params, LogitsOf({0.25, 0.1, 0.5, 0.15}));
  EXPECT_EQ(Keys(counts), (std::set<int32_t>{0, 2, 3}));
  params.top_p = 0.7f;  // 0.5 + 0.25 passes 0.7: ids 2 and 0 only
  EXPECT_EQ(Keys(Histogram(params, LogitsOf({0.25, 0.1, 0.5, 0.15}))), (std::set<int32_t>{0, 2}));
}

TEST(SamplerTest, MinPDropsTokensBelowFractionOfTheBest) {
  SamplingParams params;
  params.min_p = 0.3f;
  params.seed = 13;
  // Best 0.4: threshold 0.12 keeps 0.4, 0.2, 0.16 and 0.13 (just above) and drops 0.11 (just
  // below), so a threshold off by 10% either way fails.
  const auto counts = Histogram(params, LogitsOf({0.11, 0.4, 0.2, 0.13, 0.16}));
  EXPECT_EQ(Keys(counts), (std::set<int32_t>{1, 2, 3, 4}));
}

TEST(SamplerTest, CombinedTruncationAndFrequencyOfAHalfToken) {
  SamplingParams params;
  params.top_k = 3;     // drops id 4 (0.02)
  params.top_p = 0.9f;  // sorted 0.5, 0.3, 0.15: all needed to pass 0.9 -> none dropped more
  params.min_p = 0.4f;  // threshold 0.2 drops id 2 (0.15): left 0.5 / 0.8 and 0.3 / 0.8
  params.seed = 99;
  const auto counts = Histogram(params, LogitsOf({0.3, 0.5, 0.15, 0.03, 0.02}));
  EXPECT_EQ(Keys(counts), (std::set<int32_t>{0, 1}));

  // A token of probability exactly 0.5 after truncation: 5000 draws, sd ~0.007; [0.45, 0.55]
  // is over 7 sd wide, and with a fixed seed the outcome is deterministic anyway.
  SamplingParams half;
  half.top_k = 2;
  half.seed = 2024;
  const auto half_counts = Histogram(half, LogitsOf({0.05, 0.3, 0.05, 0.3, 0.3}), 5000);
  EXPECT_EQ(Keys(half_counts), (std::set<int32_t>{1, 3}));
  const double frequency = half_counts.at(1) / 5000.0;
  EXPECT_GE(frequency, 0.45);
  EXPECT_LE(frequency, 0.55);
}

TEST(SamplerTest, TemperatureSharpensTheDistribution) {
  SamplingParams params;
  params.seed = 5;
  params.temperature = 0.25f;  // 0.6 : 0.4 becomes 0.6^4 : 0.4^4 = 0.835 : 0.165
  const auto counts = Histogram(params, LogitsOf({0.6, 0.4}));
  const double frequency = counts.at(0) / 5000.0;
  EXPECT_GE(frequency, 0.80);  // sd ~0.005; a wide bound
  EXPECT_LE(frequency, 0.87);
}

// ---- Penalties -------------------------------------------------------------------------------

TEST(SamplerTest, RepetitionPenaltyFollowsTheFormula) {
  SamplingParams params;
  params.temperature = 0;
  params.repetition_penalty = 2.0f;
  Sampler sampler = MakeSampler(params, 4, {0, 1});  // prompt holds 0 and 1
  // 0: 3 -> 1.5; 1: -1 -> -2; 2: 2 (unseen), 3: 1 (unseen). Greedy picks 2, not 0.
  PS_ASSERT_OK_AND_ASSIGN(SampleResult a, sampler.Sample(std::vector<float>{3, -1, 2, 1}));
  EXPECT_EQ(a.token_id, 2);
  EXPECT_EQ(
      std::vector<float>(sampler.penalized_logits().begin(), sampler.penalized_logits().end()),
      (std::vector<float>{1.5f, -2.0f, 2.0f, 1.0f}));
  // Once generated (twice), 3 is penalized once, like a prompt token (no count dependence).
  ASSERT_THAT(sampler.Accept(3), IsOk());
  ASSERT_THAT(sampler.Accept(3), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(SampleResult b, sampler.Sample(std::vector<float>{3, -1, 2, 5}));
  EXPECT_EQ(b.token_id, 3);  // 5 / 2 = 2.5 > 2
  EXPECT_EQ(
      std::vector<float>(sampler.penalized_logits().begin(), sampler.penalized_logits().end()),
      (std::vector<float>{1.5f, -2.0f, 2.0f, 2.5f}));
}

TEST(SamplerTest, PresenceAndFrequencyPenaltiesCountGeneratedTokensOnly) {
  SamplingParams params;
  params.temperature = 0;
  params.presence_penalty = 0.5f;
  params.frequency_penalty = 0.25f;
  params.logprobs = true;
  Sampler sampler = MakeSampler(params, 4, {2, 2, 2});  // the prompt does not count
  ASSERT_THAT(sampler.Accept(0), IsOk());
  ASSERT_THAT(sampler.Accept(0), IsOk());
  ASSERT_THAT(sampler.Accept(0), IsOk());
  ASSERT_THAT(sampler.Accept(1), IsOk());
  const std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.75f};
  PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(logits));
  // 0: 2 - 0.5 - 0.75 = 0.75; 1: 1 - 0.5 - 0.25 = 0.25; 2: 0.5; 3: 0.75 -> tie, lowest id 0.
  EXPECT_EQ(
      std::vector<float>(sampler.penalized_logits().begin(), sampler.penalized_logits().end()),
      (std::vector<float>{0.75f, 0.25f, 0.5f, 0.75f}));
  EXPECT_EQ(result.token_id, 0);
  // The reported logprob is of the raw logits, not the penalized ones.
  const double log_z = std::log(std::exp(2.0) + std::exp(1.0) + std::exp(0.5) + std::exp(0.75));
  EXPECT_NEAR(result.logprob, 2.0 - log_z, 1e-5);  // float rounding of a value near -0.5
  EXPECT_EQ(sampler.num_generated(), 4);
}

TEST(SamplerTest, NegativePresencePenaltyEncouragesRepeats) {
  SamplingParams params;
  params.temperature = 0;
  params.presence_penalty = -1.0f;
  Sampler sampler = MakeSampler(params, 3);
  ASSERT_THAT(sampler.Accept(2), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(std::vector<float>{1.5f, 0, 1}));
  EXPECT_EQ(result.token_id, 2);  // 1 + 1 = 2 > 1.5
}

TEST(SamplerTest, PenaltiesNeverCreateInfinities) {
  SamplingParams params;
  params.repetition_penalty = 1e-6f;  // huge / tiny overflows float
  params.seed = 1;
  const float huge = std::numeric_limits<float>::max() / 2;
  Sampler sampler = MakeSampler(params, 3, {0});
  PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(std::vector<float>{huge, 0, -kInf}));
  EXPECT_EQ(result.token_id, 0);
  EXPECT_TRUE(std::isfinite(sampler.penalized_logits()[0]));
  EXPECT_EQ(sampler.penalized_logits()[2], -kInf);
}

// ---- Logprobs --------------------------------------------------------------------------------

TEST(SamplerTest, LogprobsAreRawLogSoftmaxAndTopLogprobsSortedDescending) {
  SamplingParams params;
  params.logprobs = true;
  params.top_logprobs = 5;
  params.temperature = 0.7f;
  params.repetition_penalty = 1.3f;
  params.seed = 77;
  const int kVocab = 97;  // odd, not a power of two
  std::vector<float> logits(kVocab);
  for (int id = 0; id < kVocab; ++id) logits[id] = static_cast<float>(5 * std::cos(id * 0.37));
  logits[40] = logits[41];  // a tie inside the top 5 resolves by id
  double max_logit = -INFINITY;
  for (float l : logits) max_logit = std::max<double>(max_logit, l);
  double sum = 0;
  for (float l : logits) sum += std::exp(l - max_logit);
  const double log_z = max_logit + std::log(sum);

  Sampler sampler = MakeSampler(params, kVocab, {1, 2, 3});
  for (int step = 0; step < 20; ++step) {
    PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(logits));
    // 1e-5: float rounding of values of magnitude < 20.
    EXPECT_NEAR(result.logprob, logits[result.token_id] - log_z, 1e-5);
    ASSERT_EQ(result.top_logprobs.size(), 5u);
    std::vector<int32_t> order(kVocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&logits](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    for (int i = 0; i < 5; ++i) {
      EXPECT_EQ(result.top_logprobs[i].token_id, order[i]) << i;
      EXPECT_NEAR(result.top_logprobs[i].logprob, logits[order[i]] - log_z, 1e-5);
      if (i > 0) {
        EXPECT_GE(result.top_logprobs[i - 1].logprob, result.top_logprobs[i].logprob);
      }
    }
    ASSERT_THAT(sampler.Accept(result.token_id), IsOk());
  }
}

TEST(SamplerTest, NoLogprobsUnlessAsked) {
  SamplingParams params;
  params.top_logprobs = 3;  // ignored without logprobs
  Sampler sampler = MakeSampler(params, 8);
  PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(std::vector<float>(8, 1.0f)));
  EXPECT_EQ(result.logprob, 0.0f);
  EXPECT_TRUE(result.top_logprobs.empty());
}

TEST(SamplerTest, TopLogprobsLargerThanVocabAreClamped) {
  SamplingParams params;
  params.logprobs = true;
  params.top_logprobs = 20;
  Sampler sampler = MakeSampler(params, 3);
  PS_ASSERT_OK_AND_ASSIGN(SampleResult result, sampler.Sample(std::vector<float>{0, 2, 1}));
  ASSERT_EQ(result.top_logprobs.size(), 3u);
  EXPECT_EQ(result.top_logprobs[0].token_id, 1);
  EXPECT_EQ(result.top_logprobs[2].token_id, 0);
}

}  // namespace
}  // namespace ps::engine
