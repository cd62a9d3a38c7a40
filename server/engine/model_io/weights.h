// Loading a model directory (config.json + model.safetensors, docs/model-format.md) into float32
// host arrays, after checking the file against the config: every expected tensor present with
// its exact shape, nothing else, floating dtypes only. The engine converts these arrays into its
// backend's layout; nothing here knows about backends.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_IO_WEIGHTS_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_IO_WEIGHTS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "server/engine/model_io/model_config.h"
#include "server/engine/model_io/safetensors.h"

namespace ps::engine {

// One weight, float32, row-major (C order): element (i, j) of a [rows, cols] tensor is
// data[i * cols + j]. Linear weights keep PyTorch's [out, in] layout (y = x W^T).
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;           // size == product of shape
  DType stored_dtype = DType::kF32;  // the dtype in the file, before conversion
};

// A loaded model: its config and every weight the config calls for (ModelConfig::ExpectedTensors),
// keyed by name. Owns all of its memory (the file is unmapped once loading finishes). Plain data:
// movable and copyable; thread-compatible (concurrent const access is safe).
struct ModelWeights {
  ModelConfig config;
  std::map<std::string, HostTensor, std::less<>> tensors;

  // The tensor called `name`. Every name of config.ExpectedTensors() is present (LoadWeights
  // guarantees it), so asking for one of those never fails; any other name returns nullptr.
  const HostTensor* Find(absl::string_view name) const;
};

// A 64-bit fingerprint of the model function: every config field that shapes it and every
// weight's name, shape and float32 values (base/hash.h). Two servers whose models have the same
// fingerprint compute the same function, so a state exported by one continues on the other.
uint64_t ModelFingerprint(const ModelWeights& weights);

// Loads `model_dir`. Errors:
//   NotFound         config.json or model.safetensors does not exist;
//   InvalidArgument  config.json is malformed or breaks a rule (LoadModelConfig);
//   DataLoss         model.safetensors is corrupt (SafetensorsFile::Open), or lacks a tensor the
//                    config expects, has one it does not, has one with another shape, or stores
//                    one in an integer dtype. Messages name the file and the tensor.
// The header is checked against the config before any tensor data is read. F16 and BF16 convert
// to float exactly; F64 rounds to nearest.
[[nodiscard]] absl::StatusOr<ModelWeights> LoadWeights(absl::string_view model_dir);

// The second half of LoadWeights: checks an open `file` against a valid `config` (which
// ParseModelConfig or LoadModelConfig returned) and converts its tensors. Errors: the DataLoss
// cases of LoadWeights, naming file.path(). Lets the fuzz targets and tests check a model held
// in memory through the same code.
[[nodiscard]] absl::StatusOr<ModelWeights> WeightsFromFile(ModelConfig config,
                                                           const SafetensorsFile& file);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_IO_WEIGHTS_H_
