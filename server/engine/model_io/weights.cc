// LoadWeights: config first, then the safetensors header against the config (names, shapes,
// dtypes), and only then the conversion of tensor data to float32.
#include "server/engine/model_io/weights.h"

#include <cstring>
#include <filesystem>
#include <set>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <nlohmann/json.hpp>

#include "base/hash.h"
#include "base/status_macros.h"
#include "server/engine/model_io/json_util.h"

namespace ps::engine {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

const HostTensor* ModelWeights::Find(absl::string_view name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : &it->second;
}

uint64_t ModelFingerprint(const ModelWeights& weights) {
  const ModelConfig& c = weights.config;
  uint64_t h = Fingerprint64Combine(0x6d6f64656cULL, static_cast<uint64_t>(c.vocab_size));
  for (const int64_t v : {c.d_model, c.n_layers, c.n_heads, c.d_ff}) {
    h = Fingerprint64Combine(h, static_cast<uint64_t>(v));
  }
  uint64_t eps_bits;
  static_assert(sizeof(eps_bits) == sizeof(c.norm_eps));
  std::memcpy(&eps_bits, &c.norm_eps, sizeof(eps_bits));
  h = Fingerprint64Combine(h, eps_bits);
  for (const AttentionConfig& a : c.layers) {
    for (const int64_t v : {static_cast<int64_t>(a.kind), static_cast<int64_t>(a.sketch),
                            a.sketch_size, static_cast<int64_t>(a.local_exact), a.block_size,
                            a.window, a.stride, a.chunk, a.summary}) {
      h = Fingerprint64Combine(h, static_cast<uint64_t>(v));
    }
  }
  // Mixed in only when it is not the default, so that a model whose config lacks the key keeps
  // the fingerprint it had before the key existed (and the states exported with it).
  if (c.position_encoding != PositionEncoding::kSinusoidalRope) {
    h = Fingerprint64Combine(h, 0x706f73656e63ULL);  // "posenc"
    h = Fingerprint64Combine(h, static_cast<uint64_t>(c.position_encoding));
  }
  // std::map: tensors in name order, so the value does not depend on the file's order.
  for (const auto& [name, tensor] : weights.tensors) {
    h = Fingerprint64(name.data(), name.size(), h);
    h = Fingerprint64(tensor.shape.data(), tensor.shape.size() * sizeof(int64_t), h);
    h = Fingerprint64(tensor.data.data(), tensor.data.size() * sizeof(float), h);
  }
  return h;
}

absl::StatusOr<ModelWeights> LoadWeights(absl::string_view model_dir) {
  PS_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  const std::string path =
      (std::filesystem::path(std::string(model_dir)) / "model.safetensors").string();
  PS_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::Open(path));
  return WeightsFromFile(std::move(config), file);
}

absl::StatusOr<ModelWeights> WeightsFromFile(ModelConfig config, const SafetensorsFile& file) {
  ModelWeights weights;
  weights.config = std::move(config);
  const std::string& path = file.path();
  const std::vector<TensorSpec> expected = weights.config.ExpectedTensors();
  std::set<absl::string_view> expected_names;
  for (const TensorSpec& spec : expected) expected_names.insert(spec.name);
  for (const TensorView& view : file.tensors()) {
    if (!expected_names.contains(view.name)) {
      return absl::DataLossError(absl::StrCat(path, ": tensor ",
                                              JsonForError(nlohmann::json(view.name), 200),
                                              " is not part of the model its config describes"));
    }
  }
  std::vector<const TensorView*> views;
  views.reserve(expected.size());
  for (const TensorSpec& spec : expected) {
    const TensorView* view = file.Find(spec.name);
    if (view == nullptr) {
      return absl::DataLossError(absl::StrCat(path, ": tensor ", spec.name,
                                              " is missing (the config wants shape ",
                                              ShapeString(spec.shape), ")"));
    }
    if (view->shape != spec.shape) {
      return absl::DataLossError(absl::StrCat(path, ": tensor ", spec.name, " has shape ",
                                              ShapeString(view->shape), ", the config wants ",
                                              ShapeString(spec.shape)));
    }
    if (!IsFloating(view->dtype)) {
      return absl::DataLossError(absl::StrCat(path, ": tensor ", spec.name, " is ",
                                              DTypeName(view->dtype),
                                              ", weights must be F32, F16, BF16 or F64"));
    }
    views.push_back(view);
  }

  for (const TensorView* view : views) {
    HostTensor tensor;
    tensor.shape = view->shape;
    tensor.stored_dtype = view->dtype;
    tensor.data.resize(static_cast<size_t>(view->num_elements));
    ConvertToFloat32(*view, tensor.data.data());
    weights.tensors.emplace(view->name, std::move(tensor));
  }
  return weights;
}

}  // namespace ps::engine
