// Fuzz target: config.json text through ParseModelConfig (strict JSON, then the key and value
// rules). An accepted config must validate, describe a consistent set of tensors, and survive a
// round trip through JSON unchanged; a refused one must be InvalidArgument naming the source, in
// valid UTF-8 (messages go to logs and gRPC statuses).
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>

#include <absl/strings/match.h>
#include <absl/strings/string_view.h>
#include <nlohmann/json.hpp>

#include "fuzz/fuzz_check.h"
#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/tokenizer.h"

namespace {

using ps::engine::AttentionConfig;
using ps::engine::AttentionKind;
using ps::engine::ModelConfig;

// The config as a model directory's config.json would hold it (every field explicit).
nlohmann::json ToJson(const ModelConfig& c) {
  nlohmann::json j = {{"architecture", "polysketchformer"},
                      {"vocab_size", c.vocab_size},
                      {"d_model", c.d_model},
                      {"n_layers", c.n_layers},
                      {"n_heads", c.n_heads},
                      {"d_ff", c.d_ff},
                      {"max_seq_len", c.max_seq_len},
                      {"norm_eps", c.norm_eps}};
  if (!c.torch_dtype.empty()) j["torch_dtype"] = c.torch_dtype;
  j["position_encoding"] = std::string(ps::engine::PositionEncodingName(c.position_encoding));
  nlohmann::json layers = nlohmann::json::array();
  for (const AttentionConfig& a : c.layers) {
    nlohmann::json l = {{"kind", std::string(ps::engine::AttentionKindName(a.kind))}};
    if (a.kind == AttentionKind::kPolysketch) {
      l["sketch"] = std::string(ps::engine::SketchKindName(a.sketch));
      l["sketch_size"] = a.sketch_size;
      if (a.local_exact) l["local_exact"] = true;
      if (a.block_size != 0) l["block_size"] = a.block_size;
    }
    if (a.window != 0) l["window"] = a.window;
    if (a.stride != 0) l["stride"] = a.stride;
    if (a.chunk != 0) l["chunk"] = a.chunk;
    if (a.summary != 0) l["summary"] = a.summary;
    layers.push_back(l);
  }
  j["layers"] = layers;
  return j;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<ModelConfig> config = ps::engine::ParseModelConfig(text, "config.json");
  if (!config.ok()) {
    const absl::Status& s = config.status();
    PS_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument, "code %d",
                  static_cast<int>(s.code()));
    PS_FUZZ_CHECK(absl::StartsWith(s.message(), "config.json: "), "message lacks the source");
    PS_FUZZ_CHECK(ps::engine::IsValidUtf8(s.message()), "message is not valid UTF-8");
    return 0;
  }
  PS_FUZZ_CHECK(config->Validate().ok(), "accepted config fails Validate");
  PS_FUZZ_CHECK(static_cast<int64_t>(config->layers.size()) == config->n_layers, "layers");
  PS_FUZZ_CHECK(config->d_model % config->n_heads == 0 && config->head_dim() % 2 == 0, "heads");

  std::set<std::string> names;
  for (const ps::engine::TensorSpec& spec : config->ExpectedTensors()) {
    PS_FUZZ_CHECK(names.insert(spec.name).second, "tensor %s expected twice", spec.name.c_str());
    PS_FUZZ_CHECK(!spec.shape.empty(), "tensor %s has no shape", spec.name.c_str());
    for (int64_t d : spec.shape) {
      PS_FUZZ_CHECK(d >= 1, "tensor %s has dimension %lld", spec.name.c_str(),
                    static_cast<long long>(d));
    }
  }

  const std::string again = ToJson(*config).dump();
  absl::StatusOr<ModelConfig> reparsed = ps::engine::ParseModelConfig(again, "round trip");
  PS_FUZZ_CHECK(reparsed.ok(), "round trip refused: %s",
                std::string(reparsed.status().message()).c_str());
  PS_FUZZ_CHECK(*reparsed == *config, "round trip changed the config: %s", again.c_str());
  return 0;
}
