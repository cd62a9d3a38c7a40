// config.json -> ModelConfig. Parsing checks types, presence and which keys a kind allows (things
// only the JSON shows); Validate() checks values, so configs built in code get the same rules.
// Every message is "<key>: <problem>, got <value>"; ParseModelConfig prefixes the source.
#include "server/engine/model_io/model_config.h"

#include <array>
#include <cmath>
#include <filesystem>
#include <utility>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <nlohmann/json.hpp>

#include "base/mapped_file.h"
#include "base/status_macros.h"
#include "server/engine/model_io/json_util.h"

namespace ps::engine {
namespace {

using nlohmann::json;

constexpr std::array<std::pair<absl::string_view, AttentionKind>, 6> kAttentionKinds = {{
    {"softmax", AttentionKind::kSoftmax},
    {"polynomial", AttentionKind::kPolynomial},
    {"polysketch", AttentionKind::kPolysketch},
    {"sliding_window", AttentionKind::kSlidingWindow},
    {"sparse_strided", AttentionKind::kSparseStrided},
    {"sparse_fixed", AttentionKind::kSparseFixed},
}};

// Top-level keys, in the order their absence is reported (train/model.py REQUIRED_KEYS + layers).
constexpr std::array<absl::string_view, 7> kRequiredKeys = {
    "architecture", "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "layers"};
constexpr std::array<absl::string_view, 7> kOptionalKeys = {
    "d_ff",        "norm_eps", "format_version",   "tokenizer",
    "torch_dtype", "training", "position_encoding"};
constexpr std::array<absl::string_view, 3> kTorchDtypes = {"f32", "f16", "bf16"};
// train/model.py POSITION_ENCODINGS, in its order (the error message lists them so).
constexpr std::array<std::pair<absl::string_view, PositionEncoding>, 3> kPositionEncodings = {{
    {"sinusoidal+rope", PositionEncoding::kSinusoidalRope},
    {"rope", PositionEncoding::kRope},
    {"local_rope", PositionEncoding::kLocalRope},
}};

// Attention keys besides "kind", each with the kinds it applies to.
enum class AttnKey {
  kSketch,
  kSketchSize,
  kLocalExact,
  kBlockSize,
  kWindow,
  kStride,
  kChunk,
  kSummary
};
constexpr std::array<std::pair<absl::string_view, AttnKey>, 8> kAttentionKeys = {{
    {"sketch", AttnKey::kSketch},
    {"sketch_size", AttnKey::kSketchSize},
    {"local_exact", AttnKey::kLocalExact},
    {"block_size", AttnKey::kBlockSize},
    {"window", AttnKey::kWindow},
    {"stride", AttnKey::kStride},
    {"chunk", AttnKey::kChunk},
    {"summary", AttnKey::kSummary},
}};

bool Applies(AttnKey key, AttentionKind kind) {
  switch (key) {
    case AttnKey::kSketch:
    case AttnKey::kSketchSize:
    case AttnKey::kLocalExact:
    case AttnKey::kBlockSize:
      return kind == AttentionKind::kPolysketch;
    case AttnKey::kWindow:
      return kind == AttentionKind::kSlidingWindow || kind == AttentionKind::kSparseStrided;
    case AttnKey::kStride:
      return kind == AttentionKind::kSparseStrided;
    case AttnKey::kChunk:
    case AttnKey::kSummary:
      return kind == AttentionKind::kSparseFixed;
  }
  return false;
}

template <size_t N>
bool Contains(const std::array<absl::string_view, N>& names, absl::string_view name) {
  for (absl::string_view n : names) {
    if (n == name) return true;
  }
  return false;
}

std::string Quoted(absl::string_view s) { return JsonForError(json(std::string(s))); }

// A key from the file as it appears in a message: bare when it is a plain identifier (all of
// ours are), JSON-quoted otherwise so that odd keys (spaces, control characters) stay readable.
std::string KeyName(absl::string_view key) {
  bool plain = !key.empty() && key.size() <= 64;
  for (char c : key) {
    plain = plain && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_');
  }
  return plain ? std::string(key) : Quoted(key);
}

absl::Status Invalid(absl::string_view key, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(key, ": ", problem));
}

// "\"sinusoidal+rope\", \"rope\", \"local_rope\"": the accepted position_encoding values.
std::string PositionEncodingNames() {
  std::vector<std::string> names;
  for (const auto& entry : kPositionEncodings) names.push_back(Quoted(entry.first));
  return absl::StrJoin(names, ", ");
}

// The problem with an integer that must lie in [1, kMaxConfigInt], or "" when there is none.
std::string PositiveIntProblem(int64_t value) {
  if (value < 1) return absl::StrCat("must be a positive integer, got ", value);
  if (value > kMaxConfigInt) {
    return absl::StrCat("must be a positive integer <= ", kMaxConfigInt, ", got ", value);
  }
  return "";
}

absl::Status CheckPositiveInt(absl::string_view key, int64_t value) {
  std::string problem = PositiveIntProblem(value);
  return problem.empty() ? absl::OkStatus() : Invalid(key, problem);
}

// A JSON integer in [1, kMaxConfigInt] (not 1.0, not true).
absl::StatusOr<int64_t> ReadPositiveInt(const json& value, absl::string_view key) {
  if (!value.is_number_integer()) {
    return Invalid(key, absl::StrCat("must be a positive integer, got ", JsonForError(value)));
  }
  std::optional<int64_t> v = JsonToInt64(value);
  if (!v.has_value()) {  // an unsigned integer beyond int64_t
    return Invalid(key, absl::StrCat("must be a positive integer <= ", kMaxConfigInt, ", got ",
                                     JsonForError(value)));
  }
  PS_RETURN_IF_ERROR(CheckPositiveInt(key, *v));
  return *v;
}

// The member that holds integer key `key`.
int64_t* IntField(AttentionConfig& attn, AttnKey key) {
  switch (key) {
    case AttnKey::kSketchSize:
      return &attn.sketch_size;
    case AttnKey::kBlockSize:
      return &attn.block_size;
    case AttnKey::kWindow:
      return &attn.window;
    case AttnKey::kStride:
      return &attn.stride;
    case AttnKey::kChunk:
      return &attn.chunk;
    case AttnKey::kSummary:
      return &attn.summary;
    case AttnKey::kSketch:
    case AttnKey::kLocalExact:
      break;
  }
  return nullptr;  // not an integer key: callers never ask
}

absl::StatusOr<AttentionConfig> ParseAttention(const json& obj, const std::string& where) {
  if (!obj.is_object()) {
    return Invalid(where, absl::StrCat("must be an attention object, got ", JsonForError(obj)));
  }
  const std::string kind_key = absl::StrCat(where, ".kind");
  auto kind_it = obj.find("kind");
  if (kind_it == obj.end()) return Invalid(kind_key, "required key is missing");
  AttentionConfig attn;
  bool known_kind = false;
  for (const auto& [name, kind] : kAttentionKinds) {
    if (kind_it->is_string() && kind_it->get_ref<const std::string&>() == name) {
      attn.kind = kind;
      known_kind = true;
    }
  }
  if (!known_kind) {
    std::vector<std::string> names;
    for (const auto& entry : kAttentionKinds) names.push_back(Quoted(entry.first));
    return Invalid(kind_key, absl::StrCat("must be one of ", absl::StrJoin(names, ", "), ", got ",
                                          JsonForError(*kind_it)));
  }
  const std::string kind_name = Quoted(AttentionKindName(attn.kind));

  for (const auto& [key, value] : obj.items()) {
    if (key == "kind") continue;
    const std::string key_path = absl::StrCat(where, ".", KeyName(key));
    const AttnKey* found = nullptr;
    for (const auto& entry : kAttentionKeys) {
      if (entry.first == key) found = &entry.second;
    }
    if (found == nullptr) return Invalid(key_path, "unknown attention key");
    if (!Applies(*found, attn.kind)) {
      return Invalid(key_path, absl::StrCat("does not apply to attention kind ", kind_name));
    }
    if (*found == AttnKey::kSketch) {
      if (value == "random") {
        attn.sketch = SketchKind::kRandom;
      } else if (value == "learned") {
        attn.sketch = SketchKind::kLearned;
      } else {
        return Invalid(
            key_path, absl::StrCat("must be \"random\" or \"learned\", got ", JsonForError(value)));
      }
    } else if (*found == AttnKey::kLocalExact) {
      if (!value.is_boolean()) {
        return Invalid(key_path, absl::StrCat("must be true or false, got ", JsonForError(value)));
      }
      attn.local_exact = value.get<bool>();
    } else {
      PS_ASSIGN_OR_RETURN(*IntField(attn, *found), ReadPositiveInt(value, key_path));
    }
  }

  // Keys the kind needs. (Rules across keys, such as summary <= chunk, are Validate()'s.)
  auto need = [&](absl::string_view key, absl::string_view why) -> absl::Status {
    if (obj.contains(std::string(key))) return absl::OkStatus();
    return Invalid(absl::StrCat(where, ".", key),
                   absl::StrCat("required key is missing (", why, ")"));
  };
  const std::string for_kind = absl::StrCat("attention kind ", kind_name);
  switch (attn.kind) {
    case AttentionKind::kPolysketch:
      PS_RETURN_IF_ERROR(need("sketch", for_kind));
      PS_RETURN_IF_ERROR(need("sketch_size", for_kind));
      if (attn.local_exact) {
        PS_RETURN_IF_ERROR(need("block_size", "local_exact needs the trained block size"));
      }
      break;
    case AttentionKind::kSlidingWindow:
      PS_RETURN_IF_ERROR(need("window", for_kind));
      break;
    case AttentionKind::kSparseStrided:
      PS_RETURN_IF_ERROR(need("window", for_kind));
      PS_RETURN_IF_ERROR(need("stride", for_kind));
      break;
    case AttentionKind::kSparseFixed:
      PS_RETURN_IF_ERROR(need("chunk", for_kind));
      PS_RETURN_IF_ERROR(need("summary", for_kind));
      break;
    case AttentionKind::kSoftmax:
    case AttentionKind::kPolynomial:
      break;
  }
  return attn;
}

absl::Status ValidateAttention(const AttentionConfig& attn, const std::string& where) {
  auto key = [&](absl::string_view name) { return absl::StrCat(where, ".", name); };
  bool known_kind = false;
  for (const auto& entry : kAttentionKinds) known_kind |= entry.second == attn.kind;
  if (!known_kind) {
    return Invalid(key("kind"),
                   absl::StrCat("unknown attention kind value ", static_cast<int>(attn.kind)));
  }
  const std::string kind_name = Quoted(AttentionKindName(attn.kind));
  const std::string does_not_apply = absl::StrCat("does not apply to attention kind ", kind_name);
  const bool polysketch = attn.kind == AttentionKind::kPolysketch;

  // Fields the kind does not use must be unset.
  if (!polysketch) {
    if (attn.sketch != SketchKind::kNone) return Invalid(key("sketch"), does_not_apply);
    if (attn.sketch_size != 0) return Invalid(key("sketch_size"), does_not_apply);
    if (attn.local_exact) return Invalid(key("local_exact"), does_not_apply);
    if (attn.block_size != 0) return Invalid(key("block_size"), does_not_apply);
  }
  if (!Applies(AttnKey::kWindow, attn.kind) && attn.window != 0) {
    return Invalid(key("window"), does_not_apply);
  }
  if (attn.kind != AttentionKind::kSparseStrided && attn.stride != 0) {
    return Invalid(key("stride"), does_not_apply);
  }
  if (attn.kind != AttentionKind::kSparseFixed) {
    if (attn.chunk != 0) return Invalid(key("chunk"), does_not_apply);
    if (attn.summary != 0) return Invalid(key("summary"), does_not_apply);
  }

  switch (attn.kind) {
    case AttentionKind::kPolysketch:
      if (attn.sketch != SketchKind::kRandom && attn.sketch != SketchKind::kLearned) {
        return Invalid(key("sketch"), "must be \"random\" or \"learned\"");
      }
      PS_RETURN_IF_ERROR(CheckPositiveInt(key("sketch_size"), attn.sketch_size));
      if (attn.local_exact || attn.block_size != 0) {  // 0: not given, allowed without local_exact
        PS_RETURN_IF_ERROR(CheckPositiveInt(key("block_size"), attn.block_size));
      }
      break;
    case AttentionKind::kSlidingWindow:
      PS_RETURN_IF_ERROR(CheckPositiveInt(key("window"), attn.window));
      break;
    case AttentionKind::kSparseStrided:
      PS_RETURN_IF_ERROR(CheckPositiveInt(key("window"), attn.window));
      PS_RETURN_IF_ERROR(CheckPositiveInt(key("stride"), attn.stride));
      break;
    case AttentionKind::kSparseFixed:
      PS_RETURN_IF_ERROR(CheckPositiveInt(key("chunk"), attn.chunk));
      PS_RETURN_IF_ERROR(CheckPositiveInt(key("summary"), attn.summary));
      if (attn.summary > attn.chunk) {
        return Invalid(key("summary"),
                       absl::StrCat("must be <= chunk ", attn.chunk, ", got ", attn.summary));
      }
      break;
    case AttentionKind::kSoftmax:
    case AttentionKind::kPolynomial:
      break;
  }
  return absl::OkStatus();
}

// Everything of ParseModelConfig except the source prefix.
absl::StatusOr<ModelConfig> ParseConfigObject(const json& obj) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("must be a JSON object, got ", JsonForError(obj)));
  }
  for (const auto& [key, value] : obj.items()) {
    if (key == "attention") {
      return Invalid(key,
                     "a model directory gives one attention object per layer in 'layers'; the "
                     "'attention' shorthand is only for training configs");
    }
    if (!Contains(kRequiredKeys, key) && !Contains(kOptionalKeys, key)) {
      return Invalid(KeyName(key), "unknown key");
    }
  }
  for (absl::string_view key : kRequiredKeys) {
    if (!obj.contains(std::string(key))) return Invalid(key, "required key is missing");
  }

  if (auto it = obj.find("format_version"); it != obj.end()) {
    if (JsonToInt64(*it) != kModelFormatVersion) {
      return Invalid("format_version",
                     absl::StrCat("must be ", kModelFormatVersion, ", got ", JsonForError(*it)));
    }
  }
  if (auto it = obj.find("tokenizer"); it != obj.end()) {
    if (*it != json{{"type", "bytes"}}) {
      return Invalid("tokenizer",
                     absl::StrCat("must be {\"type\":\"bytes\"} (the only tokenizer of format "
                                  "version 1), got ",
                                  JsonForError(*it)));
    }
  }
  ModelConfig config;
  if (auto it = obj.find("torch_dtype"); it != obj.end()) {
    if (!it->is_string() || !Contains(kTorchDtypes, it->get_ref<const std::string&>())) {
      return Invalid("torch_dtype",
                     absl::StrCat("must be \"f32\", \"f16\" or \"bf16\", got ", JsonForError(*it)));
    }
    config.torch_dtype = it->get<std::string>();
  }
  if (auto it = obj.find("training"); it != obj.end() && !it->is_object()) {
    return Invalid("training", absl::StrCat("must be an object, got ", JsonForError(*it)));
  }

  const json& arch = obj.at("architecture");
  if (arch != "polysketchformer") {
    return Invalid("architecture", absl::StrCat("must be \"polysketchformer\" (the only one of "
                                                "format version 1), got ",
                                                JsonForError(arch)));
  }
  PS_ASSIGN_OR_RETURN(config.vocab_size, ReadPositiveInt(obj.at("vocab_size"), "vocab_size"));
  PS_ASSIGN_OR_RETURN(config.d_model, ReadPositiveInt(obj.at("d_model"), "d_model"));
  PS_ASSIGN_OR_RETURN(config.n_layers, ReadPositiveInt(obj.at("n_layers"), "n_layers"));
  PS_ASSIGN_OR_RETURN(config.n_heads, ReadPositiveInt(obj.at("n_heads"), "n_heads"));
  PS_ASSIGN_OR_RETURN(config.max_seq_len, ReadPositiveInt(obj.at("max_seq_len"), "max_seq_len"));
  if (auto it = obj.find("d_ff"); it != obj.end()) {
    PS_ASSIGN_OR_RETURN(config.d_ff, ReadPositiveInt(*it, "d_ff"));
  } else {
    config.d_ff = (8 * config.d_model / 3) / 8 * 8;  // what the exporter writes; may be 0
  }
  if (auto it = obj.find("norm_eps"); it != obj.end()) {
    if (!it->is_number()) {
      return Invalid("norm_eps",
                     absl::StrCat("must be a number in (0, 1), got ", JsonForError(*it)));
    }
    config.norm_eps = it->get<double>();
  }
  if (auto it = obj.find("position_encoding"); it != obj.end()) {
    bool known = false;
    for (const auto& [name, encoding] : kPositionEncodings) {
      if (it->is_string() && it->get_ref<const std::string&>() == name) {
        config.position_encoding = encoding;
        known = true;
      }
    }
    if (!known) {
      return Invalid("position_encoding", absl::StrCat("must be one of ", PositionEncodingNames(),
                                                       ", got ", JsonForError(*it)));
    }
  }

  const json& layers = obj.at("layers");
  if (!layers.is_array()) {
    return Invalid("layers",
                   absl::StrCat("must be a list of attention objects, got ", JsonForError(layers)));
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    PS_ASSIGN_OR_RETURN(AttentionConfig attn,
                        ParseAttention(layers[i], absl::StrCat("layers[", i, "]")));
    config.layers.push_back(attn);
  }
  PS_RETURN_IF_ERROR(config.Validate());
  return config;
}

}  // namespace

kernels::KeyMask AttentionKeyMask(const AttentionConfig& attn) {
  using Kind = kernels::KeyMask::Kind;
  kernels::KeyMask mask;
  switch (attn.kind) {
    case AttentionKind::kSlidingWindow:
      mask.kind = Kind::kWindow;
      mask.window = attn.window;
      break;
    case AttentionKind::kSparseStrided:
      mask.kind = Kind::kStrided;
      mask.window = attn.window;
      mask.stride = attn.stride;
      break;
    case AttentionKind::kSparseFixed:
      mask.kind = Kind::kFixed;
      mask.chunk = attn.chunk;
      mask.summary = attn.summary;
      break;
    case AttentionKind::kSoftmax:
    case AttentionKind::kPolynomial:
    case AttentionKind::kPolysketch:
      break;
  }
  return mask;
}

absl::string_view AttentionKindName(AttentionKind kind) {
  for (const auto& [name, k] : kAttentionKinds) {
    if (k == kind) return name;
  }
  return "unknown";
}

absl::string_view PositionEncodingName(PositionEncoding encoding) {
  for (const auto& [name, e] : kPositionEncodings) {
    if (e == encoding) return name;
  }
  return "unknown";
}

absl::string_view SketchKindName(SketchKind kind) {
  switch (kind) {
    case SketchKind::kNone:
      return "none";
    case SketchKind::kRandom:
      return "random";
    case SketchKind::kLearned:
      return "learned";
  }
  return "unknown";
}

absl::Status ModelConfig::Validate() const {
  // Same order as train/model.py ModelConfig.validate.
  const std::pair<absl::string_view, int64_t> sizes[] = {
      {"vocab_size", vocab_size}, {"d_model", d_model},         {"n_layers", n_layers},
      {"n_heads", n_heads},       {"max_seq_len", max_seq_len}, {"d_ff", d_ff},
  };
  for (const auto& [name, value] : sizes) PS_RETURN_IF_ERROR(CheckPositiveInt(name, value));
  if (!(norm_eps > 0.0 && norm_eps < 1.0)) {  // also refuses NaN
    return Invalid("norm_eps", absl::StrCat("must be a number in (0, 1), got ", norm_eps));
  }
  if (PositionEncodingName(position_encoding) == "unknown") {
    return Invalid("position_encoding",
                   absl::StrCat("must be one of ", PositionEncodingNames(), ", got value ",
                                static_cast<int>(position_encoding)));
  }
  if (d_model % n_heads != 0) {
    return Invalid("n_heads", absl::StrCat("must divide d_model ", d_model, ", got ", n_heads));
  }
  if (d_model % 2 != 0) {
    return Invalid("d_model", absl::StrCat("must be even (sinusoidal encodings), got ", d_model));
  }
  if (head_dim() % 2 != 0) {
    return Invalid("n_heads",
                   absl::StrCat("gives head width d_model / n_heads = ", d_model, " / ", n_heads,
                                " = ", head_dim(), ", which must be even (RoPE rotates pairs)"));
  }
  if (static_cast<int64_t>(layers.size()) != n_layers) {
    return Invalid("layers",
                   absl::StrCat("has ", layers.size(), " entries, n_layers is ", n_layers));
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    PS_RETURN_IF_ERROR(ValidateAttention(layers[i], absl::StrCat("layers[", i, "]")));
  }
  if (!torch_dtype.empty() && !Contains(kTorchDtypes, torch_dtype)) {
    return Invalid("torch_dtype",
                   absl::StrCat("must be \"f32\", \"f16\" or \"bf16\", got ", Quoted(torch_dtype)));
  }
  return absl::OkStatus();
}

std::vector<TensorSpec> ModelConfig::ExpectedTensors() const {
  const int64_t V = vocab_size, D = d_model, F = d_ff, h = head_dim();
  std::vector<TensorSpec> out;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    out.push_back({std::move(name), std::move(shape)});
  };
  auto add_norm = [&](const std::string& prefix, int64_t width) {
    add(prefix + ".weight", {width});
    add(prefix + ".bias", {width});
  };
  // PyTorch's state_dict order: a module's own parameters, then its buffers, then its children
  // in registration order. The model registers embed, blocks, final_norm, then logit_bias (a
  // parameter of the top module, so it comes first).
  add("logit_bias", {V});
  add("embed.weight", {V, D});
  for (int64_t l = 0; l < n_layers; ++l) {
    const AttentionConfig& attn = layers[static_cast<size_t>(l)];
    const std::string block = absl::StrCat("blocks.", l, ".");
    add_norm(block + "ln1", D);
    add(block + "attn.qkv.weight", {3 * D, D});
    add(block + "attn.out.weight", {D, D});
    const bool polysketch = attn.kind == AttentionKind::kPolysketch;
    const int64_t r = attn.sketch_size;
    if (attn.kind == AttentionKind::kPolynomial ||
        (polysketch && attn.sketch == SketchKind::kRandom)) {
      add_norm(block + "attn.qk_norm", h);
    }
    if (polysketch && attn.sketch == SketchKind::kRandom) {
      add(block + "attn.sketch.s1", {h, r});
      add(block + "attn.sketch.s2", {h, r});
    }
    if (polysketch && attn.sketch == SketchKind::kLearned) {
      for (const char* branch : {"f1", "f2"}) {
        for (int level = 0; level < 2; ++level) {
          const int64_t in = level == 0 ? h : r;
          const std::string prefix = absl::StrCat(block, "attn.sketch.", branch, ".", level, ".");
          add_norm(prefix + "norm", in);
          add(prefix + "up.weight", {8 * r, in});
          add(prefix + "down.weight", {r, 8 * r});
        }
      }
    }
    if (polysketch && attn.local_exact) {
      add_norm(block + "attn.local_q_norm", h);
      add_norm(block + "attn.local_k_norm", h);
    }
    add_norm(block + "ln2", D);
    add(block + "ffn.up.weight", {2 * F, D});
    add(block + "ffn.down.weight", {D, F});
  }
  add_norm("final_norm", D);
  return out;
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                             absl::string_view source) {
  absl::StatusOr<json> obj = ParseStrictJson(json_text);
  if (!obj.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not valid JSON: ", obj.status().message()));
  }
  absl::StatusOr<ModelConfig> config = ParseConfigObject(*obj);
  if (!config.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", config.status().message()));
  }
  return config;
}

absl::StatusOr<ModelConfig> LoadModelConfig(absl::string_view model_dir) {
  const std::string path = (std::filesystem::path(std::string(model_dir)) / "config.json").string();
  PS_ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
  if (file.size() > kMaxConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", file.size(),
                                                   " bytes, larger than the limit of ",
                                                   kMaxConfigBytes, " for a config"));
  }
  return ParseModelConfig(file.text(), path);
}

}  // namespace ps::engine
