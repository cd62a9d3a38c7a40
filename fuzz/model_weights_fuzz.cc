// Fuzz target: a whole model directory held in memory, config.json and model.safetensors, through
// the loader's checks of the file against the config (WeightsFromFile, the second half of
// LoadWeights). The input is
//   [4 bytes: config length n, little-endian] [n bytes: config.json] [the safetensors file]
// A loaded model must hold exactly the tensors its config expects, with their shapes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <absl/strings/match.h>
#include <absl/strings/string_view.h>

#include "fuzz/fuzz_check.h"
#include "fuzz/safetensors_invariants.h"
#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/safetensors.h"
#include "server/engine/model_io/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t config_bytes;
  std::memcpy(&config_bytes, data, 4);
  const absl::string_view rest(reinterpret_cast<const char*>(data) + 4, size - 4);
  if (config_bytes > rest.size()) return 0;
  const absl::string_view config_text = rest.substr(0, config_bytes);
  const absl::string_view file_bytes = rest.substr(config_bytes);

  absl::StatusOr<ps::engine::ModelConfig> config =
      ps::engine::ParseModelConfig(config_text, "config.json");
  if (!config.ok()) return 0;  // model_config_fuzz checks these errors
  absl::StatusOr<ps::engine::SafetensorsFile> file =
      ps::engine::SafetensorsFile::FromBytes("model.safetensors", file_bytes);
  if (!file.ok()) {
    ps::fuzz::CheckSafetensorsError(file.status(), "model.safetensors: ");
    return 0;
  }
  const std::vector<ps::engine::TensorSpec> expected = config->ExpectedTensors();
  absl::StatusOr<ps::engine::ModelWeights> weights = ps::engine::WeightsFromFile(*config, *file);
  if (!weights.ok()) {
    ps::fuzz::CheckSafetensorsError(weights.status(), "model.safetensors: ");
    return 0;
  }
  PS_FUZZ_CHECK(weights->config == *config, "config changed");
  PS_FUZZ_CHECK(weights->tensors.size() == expected.size(), "%zu tensors, %zu expected",
                weights->tensors.size(), expected.size());
  PS_FUZZ_CHECK(file->tensors().size() == expected.size(), "file has extra tensors");
  for (const ps::engine::TensorSpec& spec : expected) {
    const ps::engine::HostTensor* t = weights->Find(spec.name);
    PS_FUZZ_CHECK(t != nullptr, "tensor %s missing", spec.name.c_str());
    PS_FUZZ_CHECK(t->shape == spec.shape, "tensor %s has another shape", spec.name.c_str());
    int64_t elements = 1;
    for (int64_t d : spec.shape) elements *= d;
    PS_FUZZ_CHECK(t->data.size() == static_cast<size_t>(elements), "tensor %s size",
                  spec.name.c_str());
    PS_FUZZ_CHECK(ps::engine::IsFloating(t->stored_dtype), "integer weights accepted");
  }
  return 0;
}
