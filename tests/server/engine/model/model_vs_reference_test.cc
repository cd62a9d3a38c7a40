// The CPU engine (Model on CpuBackend) against its oracle, the scalar ReferenceModel, on random
// models beyond the golden fixtures: random widths (odd head counts and head widths, so D is
// rarely a power of two), 1 to 4 layers with a random attention kind each (every kind, both
// sketches, local_exact blocks of 1 to 8 tokens that a sequence crosses many times, windows,
// strides and chunks shorter and longer than the sequence), every position encoding, random
// vocabulary and FFN widths, random weights. For each model a random token sequence runs three
// ways through the engine (one chunked prefill; prefill then decode; two sequences at different
// positions decoded in one batch) and every position's logits must equal the reference's within
// the engine contract (1e-4 relative to max(1, |want|), as the golden tests).
//
// Seeded and reproducible: case i uses seed kBaseSeed + i (PS_RANDOM_MODEL_SEED=<n> in the
// environment moves the base, to explore other models); a failure prints the seed and the whole
// config. The 48 cases take about 50 ms together on one core. Explored further (8 bases x 48
// models), 2 of 384 random models went past the tolerance at a single position (1.2e-4 and
// 1.4e-4: seeds 4045 and 7011, a degree-4 polynomial or a rank-1 random sketch amplifying fp32
// rounding of random weights), never by the O(1) errors a wrong formula makes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model/model.h"
#include "server/engine/model/reference_model.h"
#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::MaxRelError;

constexpr uint64_t kBaseSeed = 20261205;
constexpr int kNumCases = 48;
// The engine contract (model_test.cc): fp32 logits within 1e-4 of the reference, relative to
// max(1, |want|).
constexpr double kRelTol = 1e-4;

uint64_t BaseSeed() {
  const char* env = std::getenv("PS_RANDOM_MODEL_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 10) : kBaseSeed;
}

// One random model and what runs through it.
struct RandomCase {
  uint64_t seed = 0;
  ModelConfig config;
  std::vector<int32_t> tokens;
  int64_t prefill_chunk = 0;
  int64_t split_a = 0;  // tokens prefilled before decoding, sequence a
  int64_t split_b = 0;  // the same for sequence b (decoded in the same batches as a)
};

int64_t Uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

AttentionConfig RandomAttention(std::mt19937_64& rng) {
  AttentionConfig a;
  a.kind = static_cast<AttentionKind>(Uniform(rng, 0, 5));
  switch (a.kind) {
    case AttentionKind::kPolysketch:
      a.sketch = Uniform(rng, 0, 1) == 0 ? SketchKind::kRandom : SketchKind::kLearned;
      a.sketch_size = Uniform(rng, 1, 5);
      a.local_exact = Uniform(rng, 0, 1) == 1;
      // block_size is optional without local_exact (and then changes nothing).
      if (a.local_exact || Uniform(rng, 0, 2) == 0) a.block_size = Uniform(rng, 1, 8);
      break;
    case AttentionKind::kSlidingWindow:
      a.window = Uniform(rng, 1, 12);
      break;
    case AttentionKind::kSparseStrided:
      a.window = Uniform(rng, 1, 10);
      a.stride = Uniform(rng, 1, 6);
      break;
    case AttentionKind::kSparseFixed:
      a.chunk = Uniform(rng, 1, 8);
      a.summary = Uniform(rng, 1, a.chunk);
      break;
    case AttentionKind::kSoftmax:
    case AttentionKind::kPolynomial:
      break;
  }
  return a;
}

RandomCase MakeCase(uint64_t seed) {
  std::mt19937_64 rng(seed);
  RandomCase c;
  c.seed = seed;
  ModelConfig& config = c.config;
  config.n_heads = Uniform(rng, 1, 3);
  config.d_model = config.n_heads * 2 * Uniform(rng, 1, 5);  // h in {2, 4, 6, 8, 10}
  config.d_ff = Uniform(rng, 1, 3 * config.d_model);
  config.vocab_size = Uniform(rng, 3, 48);
  config.max_seq_len = 128;
  config.n_layers = Uniform(rng, 1, 4);
  for (int64_t l = 0; l < config.n_layers; ++l) config.layers.push_back(RandomAttention(rng));
  config.position_encoding = static_cast<PositionEncoding>(Uniform(rng, 0, 2));
  const int64_t n = Uniform(rng, 1, 48);
  for (int64_t i = 0; i < n; ++i) {
    c.tokens.push_back(static_cast<int32_t>(Uniform(rng, 0, config.vocab_size - 1)));
  }
  c.prefill_chunk = Uniform(rng, 1, 24);
  c.split_a = Uniform(rng, 1, n);
  c.split_b = Uniform(rng, 1, n);
  return c;
}

// Random weights of the shapes `config` calls for, at scales that keep activations O(1): matrices
// N(0, 1/in) ([out, in]; the embedding and the random sketch N(0, 1)), norm weights 1 + N(0, 0.2),
// biases N(0, 0.2).
ModelWeights RandomWeights(const ModelConfig& config, uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  ModelWeights weights;
  weights.config = config;
  for (const TensorSpec& spec : config.ExpectedTensors()) {
    HostTensor t;
    t.shape = spec.shape;
    int64_t size = 1;
    for (int64_t d : spec.shape) size *= d;
    double mean = 0.0, stddev = 0.2;
    const bool matrix = spec.shape.size() == 2;
    const bool unit =
        spec.name == "embed.weight" || spec.name.find("sketch.s") != std::string::npos;
    if (matrix) {
      stddev = unit ? 1.0 : 1.0 / std::sqrt(static_cast<double>(spec.shape[1]));
    } else if (spec.name.size() > 7 && spec.name.substr(spec.name.size() - 7) == ".weight") {
      mean = 1.0;  // a LayerNorm's scale
    }
    std::normal_distribution<double> normal(mean, stddev);
    t.data.resize(static_cast<size_t>(size));
    for (float& x : t.data) x = static_cast<float>(normal(rng));
    weights.tensors.emplace(spec.name, std::move(t));
  }
  return weights;
}

std::string Describe(const RandomCase& c) {
  const ModelConfig& m = c.config;
  std::vector<std::string> layers;
  for (const AttentionConfig& a : m.layers) {
    std::string s(AttentionKindName(a.kind));
    if (a.kind == AttentionKind::kPolysketch) {
      absl::StrAppend(&s, "(", SketchKindName(a.sketch), " r=", a.sketch_size,
                      a.local_exact ? " local_exact" : "", a.block_size ? " b=" : "",
                      a.block_size ? absl::StrCat(a.block_size) : "", ")");
    }
    if (a.window)
      absl::StrAppend(&s, "(w=", a.window, a.stride ? " s=" : "",
                      a.stride ? absl::StrCat(a.stride) : "", ")");
    if (a.chunk) absl::StrAppend(&s, "(c=", a.chunk, " k=", a.summary, ")");
    layers.push_back(s);
  }
  return absl::StrCat("seed ", c.seed, ": V=", m.vocab_size, " D=", m.d_model, " H=", m.n_heads,
                      " F=", m.d_ff, " ", PositionEncodingName(m.position_encoding), " layers [",
                      absl::StrJoin(layers, ", "), "] n=", c.tokens.size(),
                      " prefill_chunk=", c.prefill_chunk, " splits ", c.split_a, "/", c.split_b);
}

// Checks `got` [rows, V] against the reference logits of positions [first, first + rows).
void ExpectRows(const std::vector<float>& want, int64_t V, int64_t first, const float* got,
                int64_t rows, const std::string& what, double& worst) {
  for (int64_t i = 0; i < rows; ++i) {
    const double e =
        MaxRelError(got + i * V, want.data() + (first + i) * V, static_cast<size_t>(V));
    EXPECT_LE(e, kRelTol) << what << " at position " << first + i;
    worst = std::max(worst, e);
  }
}

class ModelVsReferenceTest : public ::testing::TestWithParam<int> {};

TEST_P(ModelVsReferenceTest, EngineLogitsEqualTheReferenceOnARandomModel) {
  const RandomCase c = MakeCase(BaseSeed() + static_cast<uint64_t>(GetParam()));
  SCOPED_TRACE(Describe(c));
  ASSERT_THAT(c.config.Validate(), IsOk());
  const ModelWeights weights = RandomWeights(c.config, c.seed);
  const int64_t V = c.config.vocab_size;
  const int64_t n = static_cast<int64_t>(c.tokens.size());

  // The oracle: one token at a time.
  PS_ASSERT_OK_AND_ASSIGN(ReferenceModel reference, ReferenceModel::Create(weights));
  ReferenceModel::Sequence seq = reference.NewSequence();
  std::vector<float> want;
  for (int32_t token : c.tokens) {
    PS_ASSERT_OK_AND_ASSIGN(std::vector<float> logits, reference.Step(seq, token));
    want.insert(want.end(), logits.begin(), logits.end());
  }

  kernels::cpu::CpuBackend backend(1);
  ModelOptions options;
  options.num_slots = 3;
  options.max_batch = 2;
  options.prefill_chunk = c.prefill_chunk;
  options.max_context = 64;
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Model> model, Model::Create(weights, backend, options));
  double worst = 0.0;

  // 1. The whole sequence in one (chunked) prefill.
  PS_ASSERT_OK_AND_ASSIGN(SlotId whole, model->AcquireSlot());
  std::vector<float> all;
  ASSERT_THAT(model->Prefill(whole, 0, c.tokens, {}, &all), IsOk());
  ASSERT_EQ(static_cast<int64_t>(all.size()), n * V);
  ExpectRows(want, V, 0, all.data(), n, "one prefill", worst);

  // 2. Sequences a and b: prefill of their first split tokens, then decode steps, both in one
  // batch while both have tokens left (at different positions), then the longer one alone.
  PS_ASSERT_OK_AND_ASSIGN(SlotId a, model->AcquireSlot());
  PS_ASSERT_OK_AND_ASSIGN(SlotId b, model->AcquireSlot());
  const std::vector<std::pair<SlotId, int64_t>> sequences = {{a, c.split_a}, {b, c.split_b}};
  std::vector<int64_t> next;
  for (const auto& [slot, split] : sequences) {
    std::vector<float> rows;
    ASSERT_THAT(model->Prefill(slot, 0, absl::MakeConstSpan(c.tokens).subspan(0, split), {}, &rows),
                IsOk());
    ExpectRows(want, V, 0, rows.data(), split, "split prefill", worst);
    next.push_back(split);
  }
  std::vector<float> logits(static_cast<size_t>(2 * V));
  while (next[0] < n || next[1] < n) {
    std::vector<DecodeItem> items;
    std::vector<size_t> which;
    for (size_t s = 0; s < 2; ++s) {
      if (next[s] < n) {
        items.push_back({sequences[s].first, next[s], c.tokens[static_cast<size_t>(next[s])]});
        which.push_back(s);
      }
    }
    ASSERT_THAT(model->Decode(items, absl::MakeSpan(logits).subspan(0, items.size() * V)), IsOk());
    for (size_t i = 0; i < items.size(); ++i) {
      ExpectRows(want, V, items[i].position, logits.data() + i * V, 1,
                 absl::StrCat(items.size() == 2 ? "batched" : "single", " decode of ",
                              which[i] == 0 ? "a" : "b"),
                 worst);
      ++next[which[i]];
    }
  }
  EXPECT_EQ(model->SlotPosition(a), n);
  EXPECT_EQ(model->SlotPosition(b), n);
  RecordProperty("max_rel_error", absl::StrCat(worst));
}

INSTANTIATE_TEST_SUITE_P(Seeds, ModelVsReferenceTest, ::testing::Range(0, kNumCases));

// The cases cover what they claim: every attention kind, both sketches with and without
// local_exact, every position encoding, models mixing several kinds, widths that are not powers
// of two, and sequences that cross many local blocks.
// (Checked for the fixed seeds CI runs; another PS_RANDOM_MODEL_SEED may cover less.)
TEST(ModelVsReferenceCoverageTest, TheRandomCasesCoverEveryKindAndEncoding) {
  if (BaseSeed() != kBaseSeed) GTEST_SKIP() << "PS_RANDOM_MODEL_SEED is set";
  std::set<AttentionKind> kinds;
  std::set<std::pair<SketchKind, bool>> sketches;
  std::set<PositionEncoding> encodings;
  int mixed = 0, odd_width = 0, many_blocks = 0;
  for (int i = 0; i < kNumCases; ++i) {
    const RandomCase c = MakeCase(BaseSeed() + static_cast<uint64_t>(i));
    std::set<AttentionKind> in_model;
    for (const AttentionConfig& a : c.config.layers) {
      kinds.insert(a.kind);
      in_model.insert(a.kind);
      if (a.kind == AttentionKind::kPolysketch) sketches.insert({a.sketch, a.local_exact});
      if (a.local_exact && static_cast<int64_t>(c.tokens.size()) >= 3 * a.block_size) {
        ++many_blocks;
      }
    }
    encodings.insert(c.config.position_encoding);
    if (in_model.size() >= 3) ++mixed;
    if ((c.config.d_model & (c.config.d_model - 1)) != 0) ++odd_width;
  }
  EXPECT_EQ(kinds.size(), 6u);
  EXPECT_EQ(sketches.size(), 4u);
  EXPECT_EQ(encodings.size(), 3u);
  EXPECT_GE(mixed, 5);
  EXPECT_GE(odd_width, 10);
  EXPECT_GE(many_blocks, 5);
}

}  // namespace
}  // namespace ps::engine
