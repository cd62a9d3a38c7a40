// LoadWeights: every golden fixture and shipped model loads, values arrive exactly, every dtype
// converts, and every mismatch between config.json and model.safetensors is refused by name.
#include "server/engine/model_io/weights.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/half.h"
#include "tests/testing/files.h"
#include "tests/testing/model_writer.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::nlohmann::json;
using ::ps::test::ModelTensors;
using ::ps::test::RawTensor;
using ::ps::test::StatusIs;
using ::ps::test::TempDir;
using ::ps::test::WriteModelDir;

constexpr absl::StatusCode kDataLoss = absl::StatusCode::kDataLoss;

ModelConfig SmallConfig() {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(test::SmallConfigJson(), "small");
  EXPECT_TRUE(config.ok()) << config.status();
  return *config;
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Loads `dir` and checks every tensor against the file bytes read independently of the loader.
void ExpectLoadsExactly(const std::string& dir) {
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir));
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile file, SafetensorsFile::Open(dir + "/model.safetensors"));
  const std::vector<TensorSpec> specs = weights.config.ExpectedTensors();
  ASSERT_EQ(weights.tensors.size(), specs.size());
  ASSERT_EQ(file.tensors().size(), specs.size());
  for (const TensorSpec& spec : specs) {
    const HostTensor* tensor = weights.Find(spec.name);
    ASSERT_NE(tensor, nullptr) << spec.name;
    EXPECT_EQ(tensor->shape, spec.shape);
    ASSERT_EQ(static_cast<int64_t>(tensor->data.size()), NumElements(spec.shape));
    const TensorView* view = file.Find(spec.name);
    ASSERT_NE(view, nullptr);
    ASSERT_EQ(view->dtype, DType::kF32) << "fixtures and shipped models are F32";
    EXPECT_EQ(std::memcmp(tensor->data.data(), view->data, view->num_bytes), 0) << spec.name;
  }
}

TEST(WeightsTest, LoadsEveryTinyGoldenFixture) {
  // (fixture, number of tensors, number of weights, position encoding): printed by PyTorch for
  // each fixture, len(state_dict) and sum(numel), from the configs of train/golden.py. The
  // position encoding adds no weights.
  constexpr PositionEncoding kDefault = PositionEncoding::kSinusoidalRope;
  const struct {
    const char* name;
    size_t num_tensors;
    int64_t num_weights;
    PositionEncoding position_encoding;
  } kFixtures[] = {
      {"softmax", 20, 32320, kDefault},
      {"polynomial", 24, 32384, kDefault},
      {"polysketch-random", 28, 32896, kDefault},
      {"polysketch-learned", 52, 42752, kDefault},
      {"polysketch-random-local", 36, 33024, kDefault},
      {"polysketch-learned-local", 60, 42880, kDefault},
      {"sliding-window", 20, 32320, kDefault},
      {"sparse-strided", 20, 32320, kDefault},
      {"sparse-fixed", 20, 32320, kDefault},
      {"mixed", 48, 49504, kDefault},
      {"local-rope-polysketch-learned-local", 60, 42880, PositionEncoding::kLocalRope},
      {"local-rope-polysketch-random-local", 36, 33024, PositionEncoding::kLocalRope},
      {"local-rope-mixed", 48, 49504, PositionEncoding::kLocalRope},
      {"rope-polysketch-learned-local", 60, 42880, PositionEncoding::kRope},
  };
  for (const auto& fixture : kFixtures) {
    SCOPED_TRACE(fixture.name);
    const std::string dir = test::SourcePath(absl::StrCat("tests/golden/", fixture.name));
    ExpectLoadsExactly(dir);
    PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir));
    EXPECT_EQ(weights.tensors.size(), fixture.num_tensors);
    int64_t total = 0;
    for (const auto& [name, tensor] : weights.tensors) total += NumElements(tensor.shape);
    EXPECT_EQ(total, fixture.num_weights);
    EXPECT_EQ(weights.config.d_model, 32);
    EXPECT_EQ(weights.config.head_dim(), 16);
    EXPECT_EQ(weights.config.position_encoding, fixture.position_encoding);

    // The expected outputs in golden.safetensors have the shapes the config implies.
    PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile golden,
                            SafetensorsFile::Open(dir + "/golden.safetensors"));
    const int64_t V = weights.config.vocab_size;
    EXPECT_EQ(golden.Find("prefill_logits")->shape[1], V);
    EXPECT_EQ(golden.Find("decode_logits")->shape[1], V);
    PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> greedy, golden.ReadInt32("greedy_tokens"));
    for (int32_t t : greedy) EXPECT_TRUE(t >= 0 && t < V) << t;
  }
}

// The shipped models and their golden fixtures are checked in: one that is missing fails here.
TEST(WeightsTest, LoadsTheShippedModels) {
  for (const char* name : {"tiny-polysketch", "tiny-softmax"}) {
    SCOPED_TRACE(name);
    const std::string dir = test::SourcePath(absl::StrCat("models/", name));
    ASSERT_TRUE(std::filesystem::exists(dir + "/model.safetensors")) << dir;
    ExpectLoadsExactly(dir);
    PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir));
    EXPECT_EQ(weights.config.vocab_size, 256);
    // Its golden fixture points back at the model and matches its vocabulary.
    const std::string golden_path =
        test::SourcePath(absl::StrCat("tests/golden/", name, "/golden.safetensors"));
    PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile golden, SafetensorsFile::Open(golden_path));
    EXPECT_EQ(golden.metadata().at("model_dir"), absl::StrCat("../../../models/", name));
    EXPECT_EQ(golden.Find("decode_logits")->shape[1], weights.config.vocab_size);
  }
}

TEST(WeightsTest, FingerprintFollowsThePositionEncoding) {
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights,
                          LoadWeights(test::SourcePath("tests/golden/mixed")));
  ASSERT_EQ(weights.config.position_encoding, PositionEncoding::kSinusoidalRope);
  // Pinned: a config without the position_encoding key keeps its fingerprint (the key adds to
  // the hash only when it is not the default). Re-pinned when Fingerprint64 became xxHash's XXH3
  // (state format version 2; it was 0x67a7e0aa26c54ff5 before).
  EXPECT_EQ(ModelFingerprint(weights), uint64_t{0xead8d629247e7f40});
  // The same weights under another encoding compute another function: exported states and
  // prefix-cache keys must not carry over.
  std::set<uint64_t> seen = {ModelFingerprint(weights)};
  for (const PositionEncoding encoding : {PositionEncoding::kRope, PositionEncoding::kLocalRope}) {
    weights.config.position_encoding = encoding;
    EXPECT_TRUE(seen.insert(ModelFingerprint(weights)).second) << PositionEncodingName(encoding);
  }
}

TEST(WeightsTest, F32ValuesArriveExactly) {
  TempDir dir;
  const ModelConfig config = SmallConfig();
  WriteModelDir(dir.path(), test::SmallConfigJson(), ModelTensors(config, "F32"));
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir.path()));
  EXPECT_EQ(weights.config, config);
  const std::vector<TensorSpec> specs = config.ExpectedTensors();
  for (size_t t = 0; t < specs.size(); ++t) {
    const HostTensor& tensor = *weights.Find(specs[t].name);
    EXPECT_EQ(tensor.stored_dtype, DType::kF32);
    for (size_t i = 0; i < tensor.data.size(); ++i) {
      ASSERT_EQ(tensor.data[i], test::TestValue(t, i)) << specs[t].name << "[" << i << "]";
    }
  }
  EXPECT_EQ(weights.Find("blocks.0.attn.sketch.s1")->shape, (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(weights.Find("nonexistent"), nullptr);
}

TEST(WeightsTest, HalfPrecisionConvertsExactlyIncludingSpecialValues) {
  for (const char* dtype : {"F16", "BF16"}) {
    SCOPED_TRACE(dtype);
    TempDir dir;
    const ModelConfig config = SmallConfig();
    WriteModelDir(dir.path(), test::SmallConfigJson(), ModelTensors(config, dtype));
    PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir.path()));
    const bool f16 = std::string(dtype) == "F16";
    int nans = 0, infinities = 0, subnormals = 0, zeros = 0;
    const std::vector<TensorSpec> specs = config.ExpectedTensors();
    for (size_t t = 0; t < specs.size(); ++t) {
      const HostTensor& tensor = *weights.Find(specs[t].name);
      EXPECT_EQ(tensor.stored_dtype, f16 ? DType::kF16 : DType::kBF16);
      for (size_t i = 0; i < tensor.data.size(); ++i) {
        const uint16_t bits = test::TestBits(t, i);
        const float want = f16 ? HalfBitsToFloat(bits) : BFloat16BitsToFloat(bits);
        const float got = tensor.data[i];
        if (std::isnan(want)) {
          ASSERT_TRUE(std::isnan(got));
          ++nans;
        } else {
          ASSERT_EQ(got, want) << specs[t].name << "[" << i << "] bits " << bits;
          ASSERT_EQ(std::signbit(got), std::signbit(want));
          infinities += std::isinf(got);
          subnormals += f16 ? (bits & 0x7C00) == 0 && (bits & 0x3FF) != 0
                            : std::fpclassify(got) == FP_SUBNORMAL;
          zeros += got == 0.0f;
        }
      }
    }
    // The bit patterns reached every class (else this test would prove less than it claims).
    EXPECT_GT(nans, 0);
    EXPECT_GT(subnormals, 0);
    EXPECT_GT(infinities, 0);
    EXPECT_GT(zeros, 0);
  }
}

TEST(WeightsTest, F64AndMixedDtypes) {
  TempDir dir;
  const ModelConfig config = SmallConfig();
  std::vector<RawTensor> tensors = ModelTensors(config, "F64");
  const std::vector<RawTensor> halves = ModelTensors(config, "F16");
  tensors[0] = halves[0];  // logit_bias in F16, the rest in F64
  WriteModelDir(dir.path(), test::SmallConfigJson(), tensors);
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir.path()));
  EXPECT_EQ(weights.Find("logit_bias")->stored_dtype, DType::kF16);
  EXPECT_EQ(weights.Find("embed.weight")->stored_dtype, DType::kF64);
  EXPECT_EQ(weights.Find("embed.weight")->data[3], test::TestValue(1, 3));
}

TEST(WeightsTest, WeightsOutliveTheFiles) {
  TempDir dir;
  const ModelConfig config = SmallConfig();
  WriteModelDir(dir.path(), test::SmallConfigJson(), ModelTensors(config, "F32"));
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights weights, LoadWeights(dir.path()));
  std::filesystem::remove(dir.Join("model.safetensors"));
  std::filesystem::remove(dir.Join("config.json"));
  EXPECT_EQ(weights.Find("final_norm.bias")->data[0],
            test::TestValue(config.ExpectedTensors().size() - 1, 0));
}

TEST(WeightsTest, MissingFilesAreNotFound) {
  TempDir dir;
  EXPECT_THAT(LoadWeights(dir.path()),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("config.json")));
  test::WriteFile(dir.Join("config.json"), test::SmallConfigJson());
  EXPECT_THAT(LoadWeights(dir.path()),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("model.safetensors")));
}

TEST(WeightsTest, BadConfigIsInvalidArgument) {
  TempDir dir;
  json config = json::parse(test::SmallConfigJson());
  config["layers"][2]["summary"] = 9;
  WriteModelDir(dir.path(), config.dump(), ModelTensors(SmallConfig(), "F32"));
  EXPECT_THAT(LoadWeights(dir.path()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       dir.Join("config.json") + ": layers[2].summary: must be <= chunk 4, got 9"));
}

TEST(WeightsTest, RefusesMissingTensors) {
  const ModelConfig config = SmallConfig();
  const std::vector<RawTensor> all = ModelTensors(config, "F32");
  for (size_t drop = 0; drop < all.size(); ++drop) {
    TempDir dir;
    std::vector<RawTensor> tensors = all;
    tensors.erase(tensors.begin() + static_cast<std::ptrdiff_t>(drop));
    WriteModelDir(dir.path(), test::SmallConfigJson(), tensors);
    EXPECT_THAT(LoadWeights(dir.path()),
                StatusIs(kDataLoss, absl::StrCat(dir.Join("model.safetensors"), ": tensor ",
                                                 all[drop].name, " is missing")));
  }
}

// WeightsFromFile is LoadWeights' check of a file against a config, for a model held in memory:
// same tensors on success, same errors naming the file's name.
TEST(WeightsTest, WeightsFromFileMatchesLoadWeights) {
  TempDir dir;
  const std::vector<RawTensor> tensors = ModelTensors(SmallConfig(), "F32");
  WriteModelDir(dir.path(), test::SmallConfigJson(), tensors);
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights loaded, LoadWeights(dir.path()));
  PS_ASSERT_OK_AND_ASSIGN(
      SafetensorsFile file,
      SafetensorsFile::FromBytes("held.safetensors", test::SafetensorsBytes(tensors)));
  PS_ASSERT_OK_AND_ASSIGN(ModelWeights held, WeightsFromFile(SmallConfig(), file));
  EXPECT_EQ(held.config, loaded.config);
  ASSERT_EQ(held.tensors.size(), loaded.tensors.size());
  for (const auto& [name, tensor] : loaded.tensors) {
    const HostTensor* other = held.Find(name);
    ASSERT_NE(other, nullptr) << name;
    EXPECT_EQ(other->shape, tensor.shape) << name;
    EXPECT_EQ(other->data, tensor.data) << name;
  }

  std::vector<RawTensor> fewer = tensors;
  fewer.pop_back();
  PS_ASSERT_OK_AND_ASSIGN(
      SafetensorsFile partial,
      SafetensorsFile::FromBytes("held.safetensors", test::SafetensorsBytes(fewer)));
  EXPECT_THAT(WeightsFromFile(SmallConfig(), partial),
              StatusIs(kDataLoss, absl::StrCat("held.safetensors: tensor ", tensors.back().name,
                                               " is missing")));
}

TEST(WeightsTest, RefusesUnexpectedTensors) {
  TempDir dir;
  std::vector<RawTensor> tensors = ModelTensors(SmallConfig(), "F32");
  tensors.push_back({"blocks.0.attn.extra", "F32", {1}, test::F32Bytes({1})});
  WriteModelDir(dir.path(), test::SmallConfigJson(), tensors);
  EXPECT_THAT(LoadWeights(dir.path()),
              StatusIs(kDataLoss, absl::StrCat(dir.Join("model.safetensors"),
                                               ": tensor \"blocks.0.attn.extra\" is not part of")));
}

TEST(WeightsTest, RefusesTensorsOfAnotherModel) {
  // Weights of a config with one layer fewer: the third block's tensors are missing.
  TempDir dir;
  json smaller = json::parse(test::SmallConfigJson());
  smaller["n_layers"] = 2;
  smaller["layers"].erase(2);
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig two_layers, ParseModelConfig(smaller.dump(), "two"));
  WriteModelDir(dir.path(), test::SmallConfigJson(), ModelTensors(two_layers, "F32"));
  EXPECT_THAT(LoadWeights(dir.path()),
              StatusIs(kDataLoss, "tensor blocks.2.ln1.weight is missing"));
  // And the other way round: tensors the config does not know.
  WriteModelDir(dir.path(), smaller.dump(), ModelTensors(SmallConfig(), "F32"));
  EXPECT_THAT(LoadWeights(dir.path()), StatusIs(kDataLoss, "tensor \"blocks.2."));
}

TEST(WeightsTest, RefusesWrongShapes) {
  const std::vector<std::vector<int64_t>> wrong = {{4, 8}, {256}, {256, 8, 1}, {}, {8, 256}};
  for (const std::vector<int64_t>& shape : wrong) {
    TempDir dir;
    std::vector<RawTensor> tensors = ModelTensors(SmallConfig(), "F32");
    ASSERT_EQ(tensors[1].name, "embed.weight");
    tensors[1].shape = shape;
    tensors[1].bytes = test::F32Bytes(std::vector<float>(static_cast<size_t>(NumElements(shape))));
    WriteModelDir(dir.path(), test::SmallConfigJson(), tensors);
    EXPECT_THAT(
        LoadWeights(dir.path()),
        StatusIs(kDataLoss,
                 absl::StrCat(dir.Join("model.safetensors"), ": tensor embed.weight has shape [",
                              absl::StrJoin(shape, ", "), "], the config wants [256, 8]")));
  }
}

TEST(WeightsTest, RefusesIntegerDtypes) {
  for (const char* dtype : {"I32", "I64", "U8"}) {
    TempDir dir;
    std::vector<RawTensor> tensors = ModelTensors(SmallConfig(), "F32");
    RawTensor& bias = tensors[0];  // logit_bias [256]
    bias.dtype = dtype;
    const size_t size = std::string(dtype) == "I64" ? 8 : std::string(dtype) == "U8" ? 1 : 4;
    bias.bytes = std::string(256 * size, '\0');
    WriteModelDir(dir.path(), test::SmallConfigJson(), tensors);
    EXPECT_THAT(LoadWeights(dir.path()),
                StatusIs(kDataLoss, absl::StrCat(": tensor logit_bias is ", dtype,
                                                 ", weights must be F32, F16, BF16 or F64")));
  }
}

TEST(WeightsTest, CorruptFilesAreDataLoss) {
  TempDir dir;
  WriteModelDir(dir.path(), test::SmallConfigJson(), ModelTensors(SmallConfig(), "F32"));
  const std::string path = dir.Join("model.safetensors");
  const std::string full = test::ReadFile(path);
  // A few cuts: in the length, in the header, in the data of the first and the last tensor.
  for (size_t size : {size_t{4}, size_t{100}, full.size() / 2, full.size() - 1}) {
    test::WriteFile(path, full.substr(0, size));
    EXPECT_THAT(LoadWeights(dir.path()), StatusIs(kDataLoss, path)) << size;
  }
}

}  // namespace
}  // namespace ps::engine
