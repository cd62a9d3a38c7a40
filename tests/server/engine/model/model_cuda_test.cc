// Model on the CUDA backend against the PyTorch golden fixtures (every attention kind and the
// shipped models): the same checks as model_test.cc's golden test, at two GEMM precisions, and
// prompt log-probabilities through the scheduler (every token's logits of a chunk on the device).
// Skips itself (GTEST_SKIP) when no CUDA device is visible, so CPU-only CI stays green.
//   * GemmPrecision::kFp32 (cublasSgemm): every op in fp32, so the engine contract of issue 4
//     applies unchanged: logits within 1e-4 of the float64 reference relative to max(1, |want|),
//     greedy tokens identical.
//   * GemmPrecision::kBf16 (the serving default): GEMM operands rounded to bf16 (8 significant
//     bits, relative 2^-9 per operand), fp32 accumulation. The error compounds over layers and is
//     amplified by the degree-4 attention weights: with exact bf16 rounding (the SIMT emulator,
//     kernels/cuda/emulation) the golden fixtures show max relative logit errors from 0.043
//     (softmax) to 0.16 (learned sketch + local_exact). So logits within kBf16RelTol = 0.25
//     relative to max(1, |want|) (about 1.5x the worst measured), and greedy tokens identical at
//     every step whose golden top-1 minus top-2 margin is at least kBf16MinMargin = 0.1 (none of
//     those differed under emulation; the golden files record margins down to 1e-3, below the
//     bf16 error). Decode is teacher-forced with the golden tokens, so one close call cannot
//     cascade. The fp32 run is the tight functional check; this one bounds what bf16 costs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cuda/cuda_backend.h"
#include "server/engine/model/model.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/files.h"
#include "tests/testing/golden.h"
#include "tests/testing/model_writer.h"
#include "tests/testing/prompt_logprobs_check.h"
#include "tests/testing/recorder.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using kernels::cuda::GemmPrecision;
using ::ps::test::Argmax;
using ::ps::test::IsOk;
using ::ps::test::MaxRelError;
using ::ps::test::StatusIs;

constexpr double kFp32RelTol = 1e-4;
constexpr double kBf16RelTol = 0.25;
constexpr double kBf16MinMargin = 0.1;

// Top-1 minus top-2 of the golden logits.
double Margin(const float* logits, int64_t V) {
  std::vector<float> sorted(logits, logits + V);
  std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
  return double{sorted[0]} - sorted[1];
}

class ModelCudaGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (kernels::cuda::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    PS_ASSERT_OK_AND_ASSIGN(golden_, test::LoadGoldenFixture(GetParam()));
    PS_ASSERT_OK_AND_ASSIGN(weights_, LoadWeights(golden_.model_dir));
  }
  test::GoldenFixture golden_;
  ModelWeights weights_;
};

TEST_P(ModelCudaGoldenTest, MatchesGoldenLogitsAndGreedyTokens) {
  const int64_t V = golden_.vocab_size;
  for (const GemmPrecision precision : {GemmPrecision::kFp32, GemmPrecision::kBf16}) {
    const bool bf16 = precision == GemmPrecision::kBf16;
    const double tol = bf16 ? kBf16RelTol : kFp32RelTol;
    for (int64_t chunk : {512, 5}) {
      SCOPED_TRACE(absl::StrCat(bf16 ? "bf16" : "fp32", " prefill_chunk ", chunk));
      auto backend = kernels::cuda::CudaBackend::Create({.device = 0, .gemm = precision});
      ASSERT_TRUE(backend.ok()) << backend.status();
      ModelOptions options;
      options.num_slots = 3;
      options.max_batch = 4;
      options.prefill_chunk = chunk;
      options.max_context = 4096;
      PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Model> model,
                              Model::Create(weights_, **backend, options));
      PS_ASSERT_OK_AND_ASSIGN(SlotId a, model->AcquireSlot());
      PS_ASSERT_OK_AND_ASSIGN(SlotId b, model->AcquireSlot());
      std::vector<float> all, last(static_cast<size_t>(V));
      ASSERT_THAT(model->Prefill(a, 0, golden_.tokens, absl::MakeSpan(last), &all), IsOk());
      ASSERT_THAT(model->Prefill(b, 0, golden_.tokens, {}), IsOk());
      double worst = test::ExpectPrefillMatchesGolden(all, golden_, tol);
      const int64_t n = static_cast<int64_t>(golden_.tokens.size());
      std::vector<float> logits(static_cast<size_t>(2 * V));
      const float* previous = last.data();  // logits that choose greedy[g]
      const float* previous_golden = golden_.prefill.data() + (golden_.positions.size() - 1) * V;
      int64_t close_calls = 0;
      for (size_t g = 0; g < golden_.greedy.size(); ++g) {
        const double margin = Margin(previous_golden, V);
        if (!bf16 || margin >= kBf16MinMargin) {
          EXPECT_EQ(Argmax(previous, V), golden_.greedy[g])
              << "greedy step " << g << " (golden margin " << margin << ")";
        } else {
          ++close_calls;
        }
        const int64_t pos = n + static_cast<int64_t>(g);
        const DecodeItem items[2] = {{a, pos, golden_.greedy[g]}, {b, pos, golden_.greedy[g]}};
        ASSERT_THAT(model->Decode(items, absl::MakeSpan(logits)), IsOk());
        for (int copy = 0; copy < 2; ++copy) {
          const double e = MaxRelError(logits.data() + copy * V, golden_.decode.data() + g * V,
                                       static_cast<size_t>(V));
          EXPECT_LE(e, tol) << "decode step " << g << " copy " << copy;
          worst = std::max(worst, e);
        }
        last.assign(logits.begin(), logits.begin() + V);
        previous = last.data();
        previous_golden = golden_.decode.data() + g * V;
      }
      ASSERT_TRUE((*backend)->Synchronize().ok()) << (*backend)->status();
      std::cout << "[ fixture ] " << GetParam() << (bf16 ? " bf16" : " fp32") << " chunk " << chunk
                << ": max rel error " << worst << ", greedy steps below the bf16 margin "
                << close_calls << "\n";
    }
  }
}

// Prompt log-probabilities through the scheduler on the CUDA backend (fp32 GEMMs): the logits of
// every token of each prefill chunk come from the device (final norm, tied-embedding GEMM and
// bias over all the chunk's rows, one copy to the host) and equal the reference's teacher-forced
// log-probabilities within 1e-4, with chunks of 5 tokens (blocks are 8) and 7 tokens per step.
TEST_P(ModelCudaGoldenTest, PromptLogprobsMatchGolden) {
  constexpr int32_t kTop = 3;
  auto backend = kernels::cuda::CudaBackend::Create({.device = 0, .gemm = GemmPrecision::kFp32});
  ASSERT_TRUE(backend.ok()) << backend.status();
  ModelOptions options;
  options.num_slots = 1;
  options.max_batch = 1;
  options.prefill_chunk = 5;
  options.max_context = 4096;
  SchedulerOptions scheduler_options;
  scheduler_options.prefill_tokens_per_step = 7;
  auto scheduler =
      test::MakeModelScheduler(golden_.model_dir, **backend, options, scheduler_options);
  ASSERT_NE(scheduler, nullptr);
  auto recorder = std::make_shared<test::Recorder>();
  EngineRequest request;
  request.id = "score";
  request.prompt = golden_.tokens;
  request.sampling.temperature = 0.0f;
  request.stops.max_new_tokens = 1;
  request.prompt_logprobs = true;
  request.prompt_top_logprobs = kTop;
  request.observer = recorder;
  ASSERT_THAT(scheduler->Submit(std::move(request)), IsOk());
  ASSERT_TRUE(recorder->Wait(600));
  ASSERT_EQ(recorder->result().reason, FinishReason::kLength) << recorder->result().error;
  const double worst = test::ExpectPromptLogprobsMatchGolden(golden_, recorder->prompt_logprobs(),
                                                             kTop, kFp32RelTol);
  EXPECT_EQ(recorder->tokens(), std::vector<int32_t>{golden_.greedy[0]});
  EXPECT_LE(recorder->largest_prompt_delta(), 5);
  scheduler.reset();
  ASSERT_TRUE((*backend)->Synchronize().ok()) << (*backend)->status();
  std::cout << "[ fixture ] " << GetParam() << " prompt logprobs fp32: max |error| " << worst
            << "\n";
}

// A model whose KV layers the CUDA kernels cannot run (head width above kMaxKvHeadDim, 256: their
// accumulators live in registers) is refused at load, naming the layer and the limit, instead of
// loading and leaving every attention output of that layer unwritten.
TEST(ModelCudaLoadTest, RefusesKvHeadWidthAboveTheKernelLimit) {
  if (kernels::cuda::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  const std::string config_json = R"({
  "architecture": "polysketchformer", "vocab_size": 256, "d_model": 264, "n_layers": 1,
  "n_heads": 1, "d_ff": 16, "max_seq_len": 64, "norm_eps": 1e-05,
  "layers": [{"kind": "softmax"}],
  "format_version": 1, "tokenizer": {"type": "bytes"}, "torch_dtype": "f32"
})";
  PS_ASSERT_OK_AND_ASSIGN(const ModelConfig config, ParseModelConfig(config_json, "head-dim-264"));
  ASSERT_EQ(config.head_dim(), 264);
  test::TempDir dir;
  test::WriteModelDir(dir.path(), config_json, test::ModelTensors(config, "F32"));
  PS_ASSERT_OK_AND_ASSIGN(const ModelWeights weights, LoadWeights(dir.path()));
  auto backend = kernels::cuda::CudaBackend::Create();
  ASSERT_TRUE(backend.ok()) << backend.status();
  ModelOptions options;
  options.num_slots = 1;
  options.max_batch = 1;
  EXPECT_THAT(Model::Create(weights, **backend, options),
              StatusIs(absl::StatusCode::kUnimplemented,
                       "layer 0: the cuda backend cannot run this model: the cuda backend's KV "
                       "attention kernels support head_dim up to 256, got 264"));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelCudaGoldenTest,
                         ::testing::ValuesIn(test::GoldenFixtureNames()),
                         [](const ::testing::TestParamInfo<std::string>& param_info) {
                           return test::GoldenTestName(param_info.param);
                         });

}  // namespace
}  // namespace ps::engine
