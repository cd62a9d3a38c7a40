// config.json: every key of docs/model-format.md, every rule of train/model.py validate (the
// cases of tests/python/test_config.py and more), the derived sizes and the expected tensors.
#include "server/engine/model_io/model_config.h"

#include <cmath>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "server/engine/model_io/json_util.h"
#include "tests/testing/files.h"
#include "tests/testing/model_writer.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::nlohmann::json;
using ::ps::test::IsOk;
using ::ps::test::StatusIs;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr char kSource[] = "models/x/config.json";

const json kPolysketch = {{"kind", "polysketch"},
                          {"sketch", "learned"},
                          {"sketch_size", 4},
                          {"local_exact", true},
                          {"block_size", 3}};

// A valid config (train/python test_config.py BASE with explicit layers) to modify.
json Base() {
  return {{"architecture", "polysketchformer"},
          {"vocab_size", 32},
          {"d_model", 16},
          {"n_layers", 3},
          {"n_heads", 2},
          {"max_seq_len", 64},
          {"layers", json::array({kPolysketch,
                                  {{"kind", "softmax"}},
                                  {{"kind", "sparse_fixed"}, {"chunk", 4}, {"summary", 1}}})}};
}

// Base() whose every layer is `attention`.
json WithAttention(const json& attention) {
  json config = Base();
  config["layers"] = json::array({attention, attention, attention});
  return config;
}

absl::StatusOr<ModelConfig> Parse(const json& config) {
  return ParseModelConfig(config.dump(), kSource);
}

// Asserts that `config` is refused with InvalidArgument naming the source and every piece.
void ExpectRefused(const json& config, const std::vector<std::string>& pieces) {
  absl::StatusOr<ModelConfig> result = Parse(config);
  ASSERT_THAT(result, StatusIs(kInvalid, absl::StrCat(kSource, ": "))) << config.dump();
  for (const std::string& piece : pieces) {
    EXPECT_THAT(result, StatusIs(kInvalid, piece)) << config.dump();
  }
}

TEST(ModelConfigTest, ParsesEveryKey) {
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig config, ParseModelConfig(test::SmallConfigJson(), kSource));
  EXPECT_EQ(config.vocab_size, 256);
  EXPECT_EQ(config.d_model, 8);
  EXPECT_EQ(config.n_layers, 3);
  EXPECT_EQ(config.n_heads, 2);
  EXPECT_EQ(config.head_dim(), 4);
  EXPECT_EQ(config.d_ff, 16);
  EXPECT_EQ(config.max_seq_len, 64);
  EXPECT_EQ(config.norm_eps, 1e-5);
  EXPECT_EQ(config.torch_dtype, "f32");
  ASSERT_EQ(config.layers.size(), 3u);
  const AttentionConfig random_local{.kind = AttentionKind::kPolysketch,
                                     .sketch = SketchKind::kRandom,
                                     .sketch_size = 4,
                                     .local_exact = true,
                                     .block_size = 4};
  EXPECT_EQ(config.layers[0], random_local);
  const AttentionConfig learned{
      .kind = AttentionKind::kPolysketch, .sketch = SketchKind::kLearned, .sketch_size = 2};
  EXPECT_EQ(config.layers[1], learned);
  const AttentionConfig fixed{.kind = AttentionKind::kSparseFixed, .chunk = 4, .summary = 2};
  EXPECT_EQ(config.layers[2], fixed);
  EXPECT_THAT(config.Validate(), IsOk());
}

TEST(ModelConfigTest, EveryKindAndItsKeys) {
  const std::vector<std::pair<json, AttentionConfig>> cases = {
      {{{"kind", "softmax"}}, {.kind = AttentionKind::kSoftmax}},
      {{{"kind", "polynomial"}}, {.kind = AttentionKind::kPolynomial}},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 8}},
       {.kind = AttentionKind::kPolysketch, .sketch = SketchKind::kRandom, .sketch_size = 8}},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 8}, {"block_size", 16}},
       {.kind = AttentionKind::kPolysketch,
        .sketch = SketchKind::kRandom,
        .sketch_size = 8,
        .block_size = 16}},
      {{{"kind", "sliding_window"}, {"window", 7}},
       {.kind = AttentionKind::kSlidingWindow, .window = 7}},
      {{{"kind", "sparse_strided"}, {"window", 5}, {"stride", 4}},
       {.kind = AttentionKind::kSparseStrided, .window = 5, .stride = 4}},
      {{{"kind", "sparse_fixed"}, {"chunk", 8}, {"summary", 8}},
       {.kind = AttentionKind::kSparseFixed, .chunk = 8, .summary = 8}},
  };
  for (const auto& [attention, want] : cases) {
    PS_ASSERT_OK_AND_ASSIGN(ModelConfig config, Parse(WithAttention(attention)));
    for (const AttentionConfig& layer : config.layers) EXPECT_EQ(layer, want) << attention.dump();
  }
}

TEST(ModelConfigTest, OptionalKeysAndDefaults) {
  json config = Base();
  config["d_model"] = 48;
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig parsed, Parse(config));
  EXPECT_EQ(parsed.d_ff, 128);  // floor(8 * 48 / 3 / 8) * 8, as train/model.py derives it
  EXPECT_EQ(parsed.norm_eps, 1e-5);
  EXPECT_EQ(parsed.torch_dtype, "");
  EXPECT_EQ(parsed.head_dim(), 24);
  EXPECT_EQ(parsed.position_encoding, PositionEncoding::kSinusoidalRope);

  config["d_ff"] = 24;
  config["norm_eps"] = 0.5;
  config["format_version"] = 1;
  config["tokenizer"] = {{"type", "bytes"}};
  config["torch_dtype"] = "bf16";
  config["training"] = {{"steps", 100}, {"corpus", {"anything", 1.5}}};  // ignored
  PS_ASSERT_OK_AND_ASSIGN(parsed, Parse(config));
  EXPECT_EQ(parsed.d_ff, 24);
  EXPECT_EQ(parsed.norm_eps, 0.5);
  EXPECT_EQ(parsed.torch_dtype, "bf16");
}

TEST(ModelConfigTest, PositionEncodingValues) {
  // Absent: what the configs made before the key existed compute (train/model.py
  // DEFAULT_POSITION_ENCODING): sinusoidal embedding and RoPE everywhere.
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig absent, Parse(Base()));
  EXPECT_EQ(absent.position_encoding, PositionEncoding::kSinusoidalRope);
  const std::vector<std::pair<std::string, PositionEncoding>> cases = {
      {"sinusoidal+rope", PositionEncoding::kSinusoidalRope},
      {"rope", PositionEncoding::kRope},
      {"local_rope", PositionEncoding::kLocalRope},
  };
  for (const auto& [name, want] : cases) {
    json config = Base();
    config["position_encoding"] = name;
    PS_ASSERT_OK_AND_ASSIGN(ModelConfig parsed, Parse(config));
    EXPECT_EQ(parsed.position_encoding, want) << name;
    EXPECT_EQ(PositionEncodingName(want), name);
    if (want == PositionEncoding::kSinusoidalRope) {
      EXPECT_EQ(parsed, absent);
    } else {
      EXPECT_NE(parsed, absent);
    }
  }
}

TEST(ModelConfigTest, PositionEncodingDecidesWhereRopeAndSinusoidsGo) {
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig config, Parse(Base()));  // layer 0 is local_exact
  const AttentionConfig& local = config.layers[0];
  const AttentionConfig& softmax = config.layers[1];
  ASSERT_TRUE(local.local_exact);
  EXPECT_TRUE(config.sinusoidal_embedding());
  EXPECT_TRUE(config.rope_on_qk());
  EXPECT_FALSE(config.rope_on_local_block(local));  // the local block reads the rotated q, k
  config.position_encoding = PositionEncoding::kRope;
  EXPECT_FALSE(config.sinusoidal_embedding());
  EXPECT_TRUE(config.rope_on_qk());
  EXPECT_FALSE(config.rope_on_local_block(local));
  config.position_encoding = PositionEncoding::kLocalRope;
  EXPECT_FALSE(config.sinusoidal_embedding());
  EXPECT_FALSE(config.rope_on_qk());
  EXPECT_TRUE(config.rope_on_local_block(local));
  EXPECT_FALSE(config.rope_on_local_block(softmax));
}

TEST(ModelConfigTest, RefusesBadPositionEncodings) {
  // The cases of tests/python/test_config.py test_bad_position_encoding, and near misses.
  for (const json& bad :
       {json("alibi"), json(""), json(3), json(nullptr), json("RoPE"), json("sinusoidal"),
        json("sinusoidal+rope "), json(true), json::array({"rope"}), json::object()}) {
    json config = Base();
    config["position_encoding"] = bad;
    ExpectRefused(config, {"position_encoding: must be one of \"sinusoidal+rope\", \"rope\", "
                           "\"local_rope\", got ",
                           JsonForError(bad)});
  }
  json config = Base();
  config["position_encoding"] = "alibi";
  EXPECT_THAT(Parse(config),
              StatusIs(kInvalid,
                       "models/x/config.json: position_encoding: must be one of "
                       "\"sinusoidal+rope\", \"rope\", \"local_rope\", got \"alibi\""));
}

TEST(ModelConfigTest, MessageNamesFileKeyAndValue) {
  json config = Base();
  config["layers"][2] = {{"kind", "sliding_window"}, {"window", -3}};
  EXPECT_THAT(
      Parse(config),
      StatusIs(kInvalid,
               "models/x/config.json: layers[2].window: must be a positive integer, got -3"));
}

TEST(ModelConfigTest, RefusesBadSizes) {
  for (const char* key : {"vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff"}) {
    for (const json& bad : {json(0), json(-2), json(1.5), json(2.0), json("8"), json(true),
                            json(nullptr), json::array({8}), json::object()}) {
      json config = Base();
      config[key] = bad;
      ExpectRefused(config, {absl::StrCat(key, ": must be a positive integer, got ")});
    }
    for (const char* too_big : {"2147483648", "9223372036854775807", "18446744073709551615"}) {
      json config = Base();
      config[key] = json::parse(too_big);
      ExpectRefused(
          config, {absl::StrCat(key, ": must be a positive integer <= 2147483647, got ", too_big)});
    }
  }
}

TEST(ModelConfigTest, LargestSizesAreAccepted) {
  json config = WithAttention({{"kind", "softmax"}});
  config["vocab_size"] = kMaxConfigInt;
  config["max_seq_len"] = kMaxConfigInt;
  config["d_ff"] = kMaxConfigInt;
  EXPECT_THAT(Parse(config), IsOk());
}

TEST(ModelConfigTest, RefusesBadNormEps) {
  for (const json& bad : {json(0), json(1), json(0.0), json(1.0), json(-1e-5), json(2.5),
                          json("1e-5"), json(true), json(nullptr), json::parse("1e-400")}) {
    json config = Base();
    config["norm_eps"] = bad;
    ExpectRefused(config, {"norm_eps: must be a number in (0, 1), got "});
  }
}

TEST(ModelConfigTest, RefusesUnknownAndMissingKeys) {
  for (const char* key : {"dropout", "bias", "attention_kind", "Layers", "n layers"}) {
    json config = Base();
    config[key] = 1;
    ExpectRefused(config, {key, "unknown key"});
  }
  for (const char* key :
       {"architecture", "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "layers"}) {
    json config = Base();
    config.erase(key);
    ExpectRefused(config, {absl::StrCat(key, ": required key is missing")});
  }
}

TEST(ModelConfigTest, RefusesTheAttentionShorthand) {
  json config = Base();
  config.erase("layers");
  config["attention"] = {{"kind", "softmax"}};
  ExpectRefused(config, {"attention: ", "'layers'"});
  config["layers"] = Base()["layers"];  // both given
  ExpectRefused(config, {"attention: "});
}

TEST(ModelConfigTest, RefusesOtherFormatsTokenizersAndArchitectures) {
  for (const json& bad : {json(2), json(0), json("1"), json(1.0), json(true), json(nullptr)}) {
    json config = Base();
    config["format_version"] = bad;
    ExpectRefused(config, {"format_version: must be 1, got "});
  }
  for (const json& bad : {json({{"type", "bpe"}}), json({{"type", "bytes"}, {"vocab", 256}}),
                          json("bytes"), json::object(), json(nullptr)}) {
    json config = Base();
    config["tokenizer"] = bad;
    ExpectRefused(config, {"tokenizer: must be {\"type\":\"bytes\"}"});
  }
  for (const json& bad : {json("gpt2"), json("PolySketchFormer"), json(1), json(nullptr)}) {
    json config = Base();
    config["architecture"] = bad;
    ExpectRefused(config, {"architecture: must be \"polysketchformer\""});
  }
  for (const json& bad : {json("f8"), json("float32"), json(32), json(nullptr)}) {
    json config = Base();
    config["torch_dtype"] = bad;
    ExpectRefused(config, {"torch_dtype: must be \"f32\", \"f16\" or \"bf16\""});
  }
  for (const json& bad : {json("x"), json(1), json::array(), json(nullptr)}) {
    json config = Base();
    config["training"] = bad;
    ExpectRefused(config, {"training: must be an object"});
  }
}

TEST(ModelConfigTest, RefusesBadShapes) {
  json config = Base();
  config["n_heads"] = 3;
  ExpectRefused(config, {"n_heads: must divide d_model 16, got 3"});

  config = Base();
  config["d_model"] = 15;
  config["n_heads"] = 1;
  ExpectRefused(config, {"d_model: must be even", "15"});

  config = Base();
  config["d_model"] = 18;  // h = 9
  ExpectRefused(config, {"n_heads: ", "= 9", "even"});

  config = Base();
  config["n_layers"] = 2;
  ExpectRefused(config, {"layers: has 3 entries, n_layers is 2"});
  config["n_layers"] = 4;
  ExpectRefused(config, {"layers: has 3 entries, n_layers is 4"});

  config = Base();
  config["d_model"] = 2;  // derived d_ff = floor(16/3 / 8) * 8 = 0
  config["n_heads"] = 1;
  config["layers"][0] = {{"kind", "softmax"}};
  ExpectRefused(config, {"d_ff: must be a positive integer, got 0"});
}

TEST(ModelConfigTest, RefusesBadLayerLists) {
  for (const json& bad : {json({{"kind", "softmax"}}), json("softmax"), json(3), json(nullptr)}) {
    json config = Base();
    config["layers"] = bad;
    ExpectRefused(config, {"layers: must be a list of attention objects"});
  }
  json config = Base();
  config["layers"][1] = "softmax";
  ExpectRefused(config, {"layers[1]: must be an attention object, got \"softmax\""});
  config["layers"][1] = json::object();
  ExpectRefused(config, {"layers[1].kind: required key is missing"});
  config["layers"][1] = {{"kind", "linear"}};
  ExpectRefused(config, {"layers[1].kind: must be one of \"softmax\", \"polynomial\", "
                         "\"polysketch\", \"sliding_window\", \"sparse_strided\", "
                         "\"sparse_fixed\", got \"linear\""});
  config["layers"][1] = {{"kind", 3}};
  ExpectRefused(config, {"layers[1].kind: must be one of", "got 3"});
  config["layers"][1] = {{"kind", "softmax"}, {"temperature", 2}};
  ExpectRefused(config, {"layers[1].temperature: unknown attention key"});
  config["layers"][1] = {{"kind", "softmax"}, {"w", 1}};
  ExpectRefused(config, {"layers[1].w: unknown attention key"});
}

TEST(ModelConfigTest, RefusesBadAttentionValues) {
  // (attention, expected message piece): tests/python/test_config.py test_bad_attention_values
  // and more.
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 0}},
       "layers[0].sketch_size: must be a positive integer, got 0"},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 4}, {"block_size", -1}},
       "layers[0].block_size: must be a positive integer, got -1"},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 4}, {"block_size", 0}},
       "layers[0].block_size: must be a positive integer, got 0"},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", "4"}},
       "layers[0].sketch_size: must be a positive integer, got \"4\""},
      {{{"kind", "sliding_window"}, {"window", 0}},
       "layers[0].window: must be a positive integer, got 0"},
      {{{"kind", "sliding_window"}, {"window", 2.0}},
       "layers[0].window: must be a positive integer, got 2.0"},
      {{{"kind", "sliding_window"}, {"window", true}},
       "layers[0].window: must be a positive integer, got true"},
      {{{"kind", "sliding_window"}, {"window", nullptr}},
       "layers[0].window: must be a positive integer, got null"},
      {{{"kind", "sparse_strided"}, {"window", 3}, {"stride", 0}},
       "layers[0].stride: must be a positive integer, got 0"},
      {{{"kind", "sparse_fixed"}, {"chunk", 0}, {"summary", 1}},
       "layers[0].chunk: must be a positive integer, got 0"},
      {{{"kind", "sparse_fixed"}, {"chunk", 4}, {"summary", 0}},
       "layers[0].summary: must be a positive integer, got 0"},
      {{{"kind", "sparse_fixed"}, {"chunk", 4}, {"summary", 5}},
       "layers[0].summary: must be <= chunk 4, got 5"},
      {{{"kind", "polysketch"}, {"sketch", "gaussian"}, {"sketch_size", 4}},
       "layers[0].sketch: must be \"random\" or \"learned\", got \"gaussian\""},
      {{{"kind", "polysketch"}, {"sketch", nullptr}, {"sketch_size", 4}},
       "layers[0].sketch: must be \"random\" or \"learned\", got null"},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 4}, {"local_exact", 1}},
       "layers[0].local_exact: must be true or false, got 1"},
  };
  for (const auto& [attention, piece] : cases) ExpectRefused(WithAttention(attention), {piece});
}

TEST(ModelConfigTest, RefusesMissingAttentionKeys) {
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"kind", "polysketch"}, {"sketch_size", 4}}, "layers[0].sketch: required key is missing"},
      {{{"kind", "polysketch"}, {"sketch", "random"}},
       "layers[0].sketch_size: required key is missing"},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 4}, {"local_exact", true}},
       "layers[0].block_size: required key is missing (local_exact"},
      {{{"kind", "polysketch"}, {"sketch", "learned"}, {"sketch_size", 4}, {"local_exact", true}},
       "layers[0].block_size: required key is missing"},
      {{{"kind", "sliding_window"}}, "layers[0].window: required key is missing"},
      {{{"kind", "sparse_strided"}, {"window", 3}}, "layers[0].stride: required key is missing"},
      {{{"kind", "sparse_strided"}, {"stride", 3}}, "layers[0].window: required key is missing"},
      {{{"kind", "sparse_fixed"}, {"chunk", 4}}, "layers[0].summary: required key is missing"},
      {{{"kind", "sparse_fixed"}, {"summary", 1}}, "layers[0].chunk: required key is missing"},
  };
  for (const auto& [attention, piece] : cases) ExpectRefused(WithAttention(attention), {piece});
}

TEST(ModelConfigTest, RefusesKeysThatDoNotApplyToTheKind) {
  // tests/python/test_config.py test_keys_that_do_not_apply_to_the_kind, and local_exact: false
  // on a non-polysketch kind, which Python lets through but docs/model-format.md forbids.
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"kind", "softmax"}, {"window", 4}}, "layers[0].window"},
      {{{"kind", "polynomial"}, {"sketch_size", 4}}, "layers[0].sketch_size"},
      {{{"kind", "softmax"}, {"local_exact", true}}, "layers[0].local_exact"},
      {{{"kind", "softmax"}, {"local_exact", false}}, "layers[0].local_exact"},
      {{{"kind", "sliding_window"}, {"window", 4}, {"stride", 2}}, "layers[0].stride"},
      {{{"kind", "sparse_fixed"}, {"chunk", 4}, {"summary", 1}, {"window", 4}}, "layers[0].window"},
      {{{"kind", "polysketch"}, {"sketch", "random"}, {"sketch_size", 4}, {"chunk", 4}},
       "layers[0].chunk"},
      {{{"kind", "sparse_strided"}, {"window", 4}, {"stride", 2}, {"block_size", 3}},
       "layers[0].block_size"},
      {{{"kind", "softmax"}, {"sketch", "random"}}, "layers[0].sketch"},
      {{{"kind", "sliding_window"}, {"window", 4}, {"summary", 0}}, "layers[0].summary"},
  };
  for (const auto& [attention, piece] : cases) {
    ExpectRefused(WithAttention(attention),
                  {absl::StrCat(piece, ": does not apply to attention kind \"",
                                attention["kind"].get<std::string>(), "\"")});
  }
}

TEST(ModelConfigTest, LocalExactNeedsBlockSizeOnlyWhenTrue) {
  for (const char* sketch : {"random", "learned"}) {
    json attention = {{"kind", "polysketch"}, {"sketch", sketch}, {"sketch_size", 4}};
    attention["local_exact"] = true;
    attention["block_size"] = 8;
    EXPECT_THAT(Parse(WithAttention(attention)), IsOk());
    attention.erase("block_size");
    attention["local_exact"] = false;
    EXPECT_THAT(Parse(WithAttention(attention)), IsOk());
  }
}

TEST(ModelConfigTest, RefusesMalformedJson) {
  EXPECT_THAT(ParseModelConfig("{", kSource),
              StatusIs(kInvalid, "models/x/config.json: not valid JSON"));
  EXPECT_THAT(ParseModelConfig("[1, 2]", kSource),
              StatusIs(kInvalid, "models/x/config.json: must be a JSON object, got [1,2]"));
  std::string duplicated = Base().dump();
  duplicated.insert(1, "\"d_model\": 8, ");
  EXPECT_THAT(ParseModelConfig(duplicated, kSource),
              StatusIs(kInvalid, "duplicate key \"d_model\""));
}

TEST(ModelConfigTest, LoadReadsConfigJsonFromTheDirectory) {
  test::TempDir dir;
  test::WriteFile(dir.Join("config.json"), test::SmallConfigJson());
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig config, LoadModelConfig(dir.path()));
  EXPECT_EQ(config.d_model, 8);
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig again, LoadModelConfig(dir.path() + "/"));
  EXPECT_EQ(again, config);

  test::WriteFile(dir.Join("config.json"), "{\"vocab_size\": 1}");
  EXPECT_THAT(LoadModelConfig(dir.path()),
              StatusIs(kInvalid, dir.Join("config.json") + ": architecture: required"));
}

TEST(ModelConfigTest, LoadErrors) {
  test::TempDir dir;
  EXPECT_THAT(LoadModelConfig(dir.path()),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("config.json")));
  EXPECT_THAT(LoadModelConfig(dir.Join("absent")),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("absent/config.json")));
  std::filesystem::create_directory(dir.Join("config.json"));
  EXPECT_THAT(LoadModelConfig(dir.path()), StatusIs(kInvalid, "not a regular file"));
  std::filesystem::remove(dir.Join("config.json"));
  test::WriteFile(dir.Join("config.json"), std::string(kMaxConfigBytes + 1, ' '));
  EXPECT_THAT(LoadModelConfig(dir.path()), StatusIs(kInvalid, "larger than the limit"));
}

TEST(ModelConfigTest, ValidateChecksConfigsBuiltInCode) {
  ModelConfig config;
  config.vocab_size = 256;
  config.d_model = 8;
  config.n_layers = 1;
  config.n_heads = 2;
  config.d_ff = 16;
  config.max_seq_len = 32;
  config.layers = {{.kind = AttentionKind::kSlidingWindow, .window = 4}};
  EXPECT_THAT(config.Validate(), IsOk());

  ModelConfig bad = config;
  bad.layers[0].window = 0;
  EXPECT_THAT(bad.Validate(),
              StatusIs(kInvalid, "layers[0].window: must be a positive integer, got 0"));
  bad = config;
  bad.layers[0].stride = 2;
  EXPECT_THAT(bad.Validate(),
              StatusIs(kInvalid, "layers[0].stride: does not apply to attention kind"));
  bad = config;
  bad.layers[0] = {.kind = AttentionKind::kPolysketch, .sketch_size = 4};
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "layers[0].sketch: must be"));
  bad.layers[0].sketch = SketchKind::kRandom;
  EXPECT_THAT(bad.Validate(), IsOk());
  bad.layers[0].local_exact = true;
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "layers[0].block_size: must be a positive"));
  bad = config;
  bad.layers[0] = {.kind = AttentionKind::kSoftmax, .sketch = SketchKind::kLearned};
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "layers[0].sketch: does not apply"));
  bad = config;
  bad.layers[0] = {.kind = static_cast<AttentionKind>(42)};
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "layers[0].kind"));
  bad = config;
  bad.norm_eps = std::nan("");
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "norm_eps"));
  bad = config;
  bad.position_encoding = static_cast<PositionEncoding>(7);
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "position_encoding: must be one of"));
  bad = config;
  bad.torch_dtype = "f8";
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "torch_dtype"));
  bad = config;
  bad.layers.clear();
  EXPECT_THAT(bad.Validate(), StatusIs(kInvalid, "layers: has 0 entries, n_layers is 1"));
}

TEST(ModelConfigTest, Names) {
  EXPECT_EQ(AttentionKindName(AttentionKind::kSparseStrided), "sparse_strided");
  EXPECT_EQ(AttentionKindName(AttentionKind::kPolysketch), "polysketch");
  EXPECT_EQ(SketchKindName(SketchKind::kLearned), "learned");
  EXPECT_EQ(SketchKindName(SketchKind::kNone), "none");
  EXPECT_EQ(PositionEncodingName(PositionEncoding::kLocalRope), "local_rope");
}

std::vector<std::string> Names(const std::vector<TensorSpec>& specs) {
  std::vector<std::string> names;
  for (const TensorSpec& spec : specs) names.push_back(spec.name);
  return names;
}

TEST(ModelConfigTest, ExpectedTensorsFollowPytorchStateDictOrder) {
  // The names below were printed by PyTorch: list(load_model_dir(...).state_dict()) for
  // tests/golden/polysketch-random-local (2 layers of random sketch with local_exact).
  ModelConfig config;
  config.vocab_size = 256;
  config.d_model = 32;
  config.n_layers = 2;
  config.n_heads = 2;
  config.d_ff = 80;
  config.max_seq_len = 128;
  const AttentionConfig layer{.kind = AttentionKind::kPolysketch,
                              .sketch = SketchKind::kRandom,
                              .sketch_size = 8,
                              .local_exact = true,
                              .block_size = 8};
  config.layers = {layer, layer};
  ASSERT_THAT(config.Validate(), IsOk());
  std::vector<std::string> want = {"logit_bias", "embed.weight"};
  for (int l = 0; l < 2; ++l) {
    const std::string b = absl::StrCat("blocks.", l, ".");
    for (const char* name :
         {"ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.out.weight", "attn.qk_norm.weight",
          "attn.qk_norm.bias", "attn.sketch.s1", "attn.sketch.s2", "attn.local_q_norm.weight",
          "attn.local_q_norm.bias", "attn.local_k_norm.weight", "attn.local_k_norm.bias",
          "ln2.weight", "ln2.bias", "ffn.up.weight", "ffn.down.weight"}) {
      want.push_back(b + name);
    }
  }
  want.push_back("final_norm.weight");
  want.push_back("final_norm.bias");
  const std::vector<TensorSpec> specs = config.ExpectedTensors();
  EXPECT_EQ(Names(specs), want);
  EXPECT_EQ(specs[8].shape, (std::vector<int64_t>{16, 8}));  // blocks.0.attn.sketch.s1: [h, r]
}

TEST(ModelConfigTest, ExpectedTensorsOfTheMixedFixture) {
  // PyTorch's [(name, list(shape)) for name, shape in state_dict] of tests/golden/mixed: layer 0
  // learned sketch with local_exact, layer 1 softmax, layer 2 sparse_fixed; D 32, H 2, r 8, F 80.
  const std::vector<TensorSpec> want = {
      {"logit_bias", {256}},
      {"embed.weight", {256, 32}},
      {"blocks.0.ln1.weight", {32}},
      {"blocks.0.ln1.bias", {32}},
      {"blocks.0.attn.qkv.weight", {96, 32}},
      {"blocks.0.attn.out.weight", {32, 32}},
      {"blocks.0.attn.sketch.f1.0.norm.weight", {16}},
      {"blocks.0.attn.sketch.f1.0.norm.bias", {16}},
      {"blocks.0.attn.sketch.f1.0.up.weight", {64, 16}},
      {"blocks.0.attn.sketch.f1.0.down.weight", {8, 64}},
      {"blocks.0.attn.sketch.f1.1.norm.weight", {8}},
      {"blocks.0.attn.sketch.f1.1.norm.bias", {8}},
      {"blocks.0.attn.sketch.f1.1.up.weight", {64, 8}},
      {"blocks.0.attn.sketch.f1.1.down.weight", {8, 64}},
      {"blocks.0.attn.sketch.f2.0.norm.weight", {16}},
      {"blocks.0.attn.sketch.f2.0.norm.bias", {16}},
      {"blocks.0.attn.sketch.f2.0.up.weight", {64, 16}},
      {"blocks.0.attn.sketch.f2.0.down.weight", {8, 64}},
      {"blocks.0.attn.sketch.f2.1.norm.weight", {8}},
      {"blocks.0.attn.sketch.f2.1.norm.bias", {8}},
      {"blocks.0.attn.sketch.f2.1.up.weight", {64, 8}},
      {"blocks.0.attn.sketch.f2.1.down.weight", {8, 64}},
      {"blocks.0.attn.local_q_norm.weight", {16}},
      {"blocks.0.attn.local_q_norm.bias", {16}},
      {"blocks.0.attn.local_k_norm.weight", {16}},
      {"blocks.0.attn.local_k_norm.bias", {16}},
      {"blocks.0.ln2.weight", {32}},
      {"blocks.0.ln2.bias", {32}},
      {"blocks.0.ffn.up.weight", {160, 32}},
      {"blocks.0.ffn.down.weight", {32, 80}},
      {"blocks.1.ln1.weight", {32}},
      {"blocks.1.ln1.bias", {32}},
      {"blocks.1.attn.qkv.weight", {96, 32}},
      {"blocks.1.attn.out.weight", {32, 32}},
      {"blocks.1.ln2.weight", {32}},
      {"blocks.1.ln2.bias", {32}},
      {"blocks.1.ffn.up.weight", {160, 32}},
      {"blocks.1.ffn.down.weight", {32, 80}},
      {"blocks.2.ln1.weight", {32}},
      {"blocks.2.ln1.bias", {32}},
      {"blocks.2.attn.qkv.weight", {96, 32}},
      {"blocks.2.attn.out.weight", {32, 32}},
      {"blocks.2.ln2.weight", {32}},
      {"blocks.2.ln2.bias", {32}},
      {"blocks.2.ffn.up.weight", {160, 32}},
      {"blocks.2.ffn.down.weight", {32, 80}},
      {"final_norm.weight", {32}},
      {"final_norm.bias", {32}},
  };
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig config,
                          LoadModelConfig(test::SourcePath("tests/golden/mixed")));
  EXPECT_EQ(config.ExpectedTensors(), want);
}

TEST(ModelConfigTest, ExpectedTensorsOfPolynomial) {
  ModelConfig config;
  config.vocab_size = 10;
  config.d_model = 12;
  config.n_layers = 1;
  config.n_heads = 3;
  config.d_ff = 24;
  config.max_seq_len = 8;
  config.layers = {{.kind = AttentionKind::kPolynomial}};
  ASSERT_THAT(config.Validate(), IsOk());
  const std::vector<TensorSpec> specs = config.ExpectedTensors();
  ASSERT_EQ(specs.size(), 14u);
  EXPECT_EQ(specs[6], (TensorSpec{"blocks.0.attn.qk_norm.weight", {4}}));
  EXPECT_EQ(specs[10], (TensorSpec{"blocks.0.ffn.up.weight", {48, 12}}));
  EXPECT_EQ(specs[11], (TensorSpec{"blocks.0.ffn.down.weight", {12, 24}}));
}

}  // namespace
}  // namespace ps::engine
