// --weights_dtype (server/engine/model/weights_dtype.h): values, "auto", refusals naming the flag,
// and Model::Create refusing a format its backend lacks before converting anything.
#include "server/engine/model/weights_dtype.h"

#include <limits>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model/model.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/faulty_backend.h"
#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::kernels::WeightDtype;
using ::ps::test::IsOk;
using ::ps::test::StatusIs;

class WeightsDtypeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PS_ASSERT_OK_AND_ASSIGN(weights_, LoadWeights(test::SourcePath("tests/golden/softmax")));
  }
  ModelWeights weights_;
  kernels::cpu::CpuBackend cpu_{1};
};

TEST_F(WeightsDtypeTest, ExplicitValuesAndAuto) {
  EXPECT_EQ(*ResolveWeightsDtype("fp32", weights_, cpu_), WeightDtype::kFp32);
  EXPECT_EQ(*ResolveWeightsDtype("bf16", weights_, cpu_), WeightDtype::kBf16);
  EXPECT_EQ(*ResolveWeightsDtype("int8", weights_, cpu_), WeightDtype::kInt8);
  // Stored in f32: auto is fp32 (never int8).
  EXPECT_EQ(*ResolveWeightsDtype("auto", weights_, cpu_), WeightDtype::kFp32);
  // Stored in bf16 (config.json says so): auto is bf16 on the CPU, fp32 elsewhere.
  weights_.config.torch_dtype = "bf16";
  EXPECT_EQ(*ResolveWeightsDtype("auto", weights_, cpu_), WeightDtype::kBf16);
  // Without bf16 / int8 weights, as the CUDA backend (Backend's default CheckWeightDtype).
  test::FaultyBackend gpu(cpu_, "gpu-like");
  gpu.RefuseLowPrecisionWeights();
  EXPECT_EQ(*ResolveWeightsDtype("auto", weights_, gpu), WeightDtype::kFp32);
  // ... or every matrix of the file is BF16, whatever the config says.
  weights_.config.torch_dtype = "";
  for (auto& [name, tensor] : weights_.tensors) {
    if (tensor.shape.size() == 2) tensor.stored_dtype = DType::kBF16;
  }
  EXPECT_EQ(*ResolveWeightsDtype("auto", weights_, cpu_), WeightDtype::kBf16);
}

TEST_F(WeightsDtypeTest, RefusesUnknownValuesNamingTheFlagAndTheChoices) {
  for (const std::string bad : {"", "fp16", "BF16", "int4", "auto "}) {
    EXPECT_THAT(ResolveWeightsDtype(bad, weights_, cpu_).status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         "--weights_dtype: must be one of auto, fp32, bf16, int8"))
        << bad;
    EXPECT_THAT(CheckWeightsDtypeFlag(bad), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  EXPECT_THAT(CheckWeightsDtypeFlag("int8"), IsOk());
}

TEST_F(WeightsDtypeTest, ABackendWithoutTheFormatRefusesItNamingFlagAndBackend) {
  // Without bf16 / int8 weights, as the CUDA backend (Backend's default CheckWeightDtype).
  test::FaultyBackend gpu(cpu_, "gpu-like");
  gpu.RefuseLowPrecisionWeights();
  EXPECT_THAT(ResolveWeightsDtype("bf16", weights_, gpu).status(),
              StatusIs(absl::StatusCode::kUnimplemented,
                       "--weights_dtype bf16: the gpu-like backend has no bf16 weights"));
  EXPECT_THAT(ResolveWeightsDtype("int8", weights_, gpu).status(),
              StatusIs(absl::StatusCode::kUnimplemented, "gpu-like"));
  EXPECT_THAT(ResolveWeightsDtype("fp32", weights_, gpu), IsOk());
  // Model::Create checks too, before converting a weight.
  ModelOptions options;
  options.weights_dtype = WeightDtype::kInt8;
  EXPECT_THAT(Model::Create(weights_, gpu, options).status(),
              StatusIs(absl::StatusCode::kUnimplemented, "weights_dtype int8"));
  EXPECT_EQ(gpu.ops_run(), 0);
}

TEST_F(WeightsDtypeTest, Int8RefusesNonFiniteWeightsAtLoad) {
  for (auto& [name, tensor] : weights_.tensors) {
    if (name.ends_with("attn.qkv.weight")) {
      tensor.data[3] = std::numeric_limits<float>::quiet_NaN();
      break;
    }
  }
  ModelOptions options;
  options.weights_dtype = WeightDtype::kInt8;
  EXPECT_THAT(Model::Create(weights_, cpu_, options).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "not finite"));
}

}  // namespace
}  // namespace ps::engine
