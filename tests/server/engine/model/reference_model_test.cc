// ReferenceModel end to end against the PyTorch golden fixtures (tests/golden/README.md): every
// fixture's prompt is fed one token at a time, the recorded prefill logits and the greedy decode
// must match. Plus the errors and the independence of sequences.
#include "server/engine/model/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/engine/model_io/safetensors.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/files.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

// Logits within |got - want| <= kRelTol * max(1, |want|): the reference computes in float64,
// we keep activations and states in fp32 (algorithm.md section 5), so ~1e-6 relative rounding
// per op grows through L layers and up to ~400 steps of state; the engine contract is 1e-4.
constexpr double kRelTol = 1e-4;

absl::StatusOr<ReferenceModel> LoadModel(const std::string& model_dir) {
  PS_ASSIGN_OR_RETURN(ModelWeights weights, LoadWeights(model_dir));
  return ReferenceModel::Create(std::move(weights));
}

struct ErrorStats {
  double max_abs = 0.0;
  double max_rel = 0.0;  // |got - want| / max(1, |want|)
};

// Compares one row of logits; records the largest errors seen.
void ExpectLogitsNear(const std::vector<float>& got, const std::vector<float>& want,
                      size_t want_offset, size_t V, ErrorStats& stats, const std::string& where) {
  ASSERT_EQ(got.size(), V);
  int failures = 0;
  for (size_t i = 0; i < V; ++i) {
    const double w = want[want_offset + i];
    const double error = std::fabs(got[i] - w);
    const double rel = error / std::max(1.0, std::fabs(w));
    stats.max_abs = std::max(stats.max_abs, error);
    stats.max_rel = std::max(stats.max_rel, rel);
    if (rel > kRelTol && failures++ < 5) {
      ADD_FAILURE() << where << " logit " << i << ": got " << got[i] << ", want " << w;
    }
  }
}

class ReferenceGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ReferenceGoldenTest, MatchesPrefillLogitsAndGreedyDecode) {
  PS_ASSERT_OK_AND_ASSIGN(const test::GoldenFixture golden, test::LoadGoldenFixture(GetParam()));
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel model, LoadModel(golden.model_dir));
  const size_t V = static_cast<size_t>(model.config().vocab_size);
  ASSERT_EQ(static_cast<int64_t>(V), golden.vocab_size);
  const std::vector<int32_t>& tokens = golden.tokens;
  const std::vector<int32_t>& positions = golden.positions;
  const std::vector<float>& prefill = golden.prefill;
  const std::vector<int32_t>& greedy = golden.greedy;
  const std::vector<float>& decode = golden.decode;

  ErrorStats stats;
  ReferenceModel::Sequence seq = model.NewSequence();
  std::vector<float> logits;
  for (size_t t = 0; t < tokens.size(); ++t) {
    PS_ASSERT_OK_AND_ASSIGN(logits, model.Step(seq, tokens[t]));
    for (size_t p = 0; p < positions.size(); ++p) {
      if (static_cast<size_t>(positions[p]) != t) continue;
      ExpectLogitsNear(logits, prefill, p * V, V, stats, absl::StrCat("prefill position ", t));
    }
  }
  for (size_t g = 0; g < greedy.size(); ++g) {
    ASSERT_EQ(test::Argmax(logits.data(), static_cast<int64_t>(logits.size())), greedy[g])
        << "greedy step " << g;
    PS_ASSERT_OK_AND_ASSIGN(logits, model.Step(seq, greedy[g]));
    ExpectLogitsNear(logits, decode, g * V, V, stats, absl::StrCat("decode step ", g));
  }
  EXPECT_EQ(seq.position, static_cast<int64_t>(tokens.size() + greedy.size()));
  RecordProperty("max_abs_error", absl::StrCat(stats.max_abs));
  RecordProperty("max_rel_error", absl::StrCat(stats.max_rel));
  std::cout << "[ fixture ] " << GetParam() << ": max abs error " << stats.max_abs
            << ", max rel error " << stats.max_rel << " over " << positions.size()
            << " prefill and " << greedy.size() << " decode positions\n";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ReferenceGoldenTest,
                         ::testing::ValuesIn(test::GoldenFixtureNames()),
                         [](const ::testing::TestParamInfo<std::string>& param_info) {
                           return test::GoldenTestName(param_info.param);
                         });

TEST(ReferenceModelTest, FindsEveryFixture) {
  // 10 tiny models, 4 of them again under other position encodings, 4 shipped
  // (tests/golden/README.md).
  EXPECT_GE(test::GoldenFixtureNames().size(), 18u);
}

TEST(ReferenceModelTest, RefusesTokensOutsideTheVocabulary) {
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel model, LoadModel(test::SourcePath("tests/golden/mixed")));
  ReferenceModel::Sequence seq = model.NewSequence();
  EXPECT_THAT(model.Step(seq, 256), StatusIs(absl::StatusCode::kInvalidArgument, "256"));
  EXPECT_THAT(model.Step(seq, -1), StatusIs(absl::StatusCode::kInvalidArgument, "-1"));
  EXPECT_EQ(seq.position, 0);  // unchanged by a refused token
  EXPECT_THAT(model.Step(seq, 255), IsOk());
  EXPECT_EQ(seq.position, 1);
}

TEST(ReferenceModelTest, RefusesWeightsThatLackATensor) {
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights,
                          LoadWeights(test::SourcePath("tests/golden/polysketch-learned-local")));
  weights.tensors.erase("blocks.1.attn.local_k_norm.bias");
  EXPECT_THAT(ReferenceModel::Create(std::move(weights)),
              StatusIs(absl::StatusCode::kInvalidArgument, "blocks.1.attn.local_k_norm.bias"));
}

TEST(ReferenceModelTest, InterleavedSequencesAreIndependent) {
  // mixed: learned sketch with local_exact, softmax and sparse_fixed layers.
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel model, LoadModel(test::SourcePath("tests/golden/mixed")));
  const std::vector<int32_t> a = {72,  101, 108, 108, 111, 44,  32, 119, 111, 114, 108,
                                  100, 33,  10,  84,  104, 101, 32, 101, 110, 100};
  const std::vector<int32_t> b = {0, 255, 17, 3, 200, 99, 98, 97, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  auto run_alone = [&](const std::vector<int32_t>& tokens) {
    std::vector<std::vector<float>> out;
    ReferenceModel::Sequence seq = model.NewSequence();
    for (int32_t token : tokens) out.push_back(*model.Step(seq, token));
    return out;
  };
  const auto alone_a = run_alone(a);
  const auto alone_b = run_alone(b);
  ReferenceModel::Sequence sa = model.NewSequence(), sb = model.NewSequence();
  for (size_t i = 0; i < std::max(a.size(), b.size()); ++i) {
    if (i < a.size()) {
      PS_ASSERT_OK_AND_ASSIGN(std::vector<float> logits, model.Step(sa, a[i]));
      EXPECT_EQ(logits, alone_a[i]) << "a, step " << i;  // bitwise: same arithmetic
    }
    if (i < b.size()) {
      PS_ASSERT_OK_AND_ASSIGN(std::vector<float> logits, model.Step(sb, b[i]));
      EXPECT_EQ(logits, alone_b[i]) << "b, step " << i;
    }
  }
}

TEST(ReferenceModelTest, SlidingWindowKeepsAtMostWindowEntries) {
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel model,
                          LoadModel(test::SourcePath("tests/golden/sliding-window")));
  const int64_t w = model.config().layers[0].window;
  ASSERT_EQ(w, 7);
  const size_t row = static_cast<size_t>(model.config().d_model);
  ReferenceModel::Sequence seq = model.NewSequence();
  for (int64_t t = 0; t < 30; ++t) {
    ASSERT_THAT(model.Step(seq, static_cast<int32_t>(t * 7 % 256)), IsOk());
    for (const ReferenceLayerState& layer : seq.layers) {
      const size_t m = layer.kv_positions.size();
      EXPECT_EQ(m, static_cast<size_t>(std::min(t + 1, w))) << "t=" << t;
      EXPECT_EQ(layer.kv_keys.size(), m * row);
      EXPECT_EQ(layer.kv_values.size(), m * row);
      // The kept entries are the last min(t + 1, w) positions, in order.
      for (size_t j = 0; j < m; ++j)
        EXPECT_EQ(layer.kv_positions[j], t + 1 - static_cast<int64_t>(m) + static_cast<int64_t>(j));
    }
  }
}

TEST(ReferenceModelTest, SparseFixedKeepsTheCurrentChunkAndSummaries) {
  // sparse-fixed: c 8, summary 2. After position t the list holds the current chunk
  // [8 floor(t/8), t] and positions j % 8 >= 6 of earlier chunks.
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel model,
                          LoadModel(test::SourcePath("tests/golden/sparse-fixed")));
  ReferenceModel::Sequence seq = model.NewSequence();
  for (int64_t t = 0; t < 27; ++t) {
    ASSERT_THAT(model.Step(seq, 65), IsOk());
  }
  // t = 26: chunk [24, 26] plus 6, 7, 14, 15, 22, 23.
  EXPECT_THAT(seq.layers[0].kv_positions, ::testing::ElementsAre(6, 7, 14, 15, 22, 23, 24, 25, 26));
}

TEST(ReferenceModelTest, LocalExactBufferHoldsTheCurrentBlock) {
  // polysketch-learned-local: b 8. After position t the buffer holds t % 8 + 1 tokens.
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel model,
                          LoadModel(test::SourcePath("tests/golden/polysketch-learned-local")));
  const int64_t b = model.config().layers[0].block_size;
  const size_t row = static_cast<size_t>(model.config().d_model);
  ReferenceModel::Sequence seq = model.NewSequence();
  for (int64_t t = 0; t < 3 * b + 2; ++t) {
    ASSERT_THAT(model.Step(seq, 66), IsOk());
    EXPECT_EQ(seq.layers[0].local_keys.size(), static_cast<size_t>(t % b + 1) * row) << t;
    EXPECT_EQ(seq.layers[0].local_values.size(), static_cast<size_t>(t % b + 1) * row) << t;
  }
}

}  // namespace
}  // namespace ps::engine
