// Test-side safetensors writer: nlohmann::json for the header, bytes appended by hand.
#include "tests/testing/model_writer.h"

#include <algorithm>
#include <cstring>
#include <iterator>

#include <nlohmann/json.hpp>

#include "tests/testing/files.h"

namespace ps::test {

using nlohmann::json;

namespace {

template <typename T>
std::string LittleEndianBytes(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(out.data(), values.data(), out.size());  // x86: little-endian
  return out;
}

size_t ElementCount(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

}  // namespace

std::string SafetensorsWithHeader(absl::string_view header, absl::string_view data) {
  const uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  out.append(header.data(), header.size());
  out.append(data.data(), data.size());
  return out;
}

std::string SafetensorsBytes(const std::vector<RawTensor>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  std::vector<const RawTensor*> sorted;
  for (const RawTensor& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const RawTensor* a, const RawTensor* b) { return a->name < b->name; });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string data;
  for (const RawTensor* t : sorted) {
    header[t->name] = {{"dtype", t->dtype},
                       {"shape", t->shape},
                       {"data_offsets", {data.size(), data.size() + t->bytes.size()}}};
    data += t->bytes;
    data.append((8 - data.size() % 8) % 8, '\0');
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  return SafetensorsWithHeader(text, data);
}

std::string F32Bytes(const std::vector<float>& values) { return LittleEndianBytes(values); }
std::string U16Bytes(const std::vector<uint16_t>& values) { return LittleEndianBytes(values); }
std::string I32Bytes(const std::vector<int32_t>& values) { return LittleEndianBytes(values); }

float TestValue(size_t tensor_index, size_t element) {
  // Distinct per tensor and element, exactly representable, of either sign.
  return static_cast<float>(tensor_index) * 1000.0f + static_cast<float>(element % 997) * 0.25f -
         100.0f;
}

uint16_t TestBits(size_t tensor_index, size_t element) {
  // The first elements of every tensor are special in F16, in BF16 or in both.
  constexpr uint16_t kSpecial[] = {
      0x0000, 0x8000,  // +0, -0
      0x7C00, 0xFC00,  // F16 +-inf
      0x7F80, 0xFF80,  // BF16 +-inf (F16 NaN)
      0x7E00, 0x7FC1,  // NaN in both
      0x0001, 0x807F,  // subnormal in both
      0x03FF, 0x7BFF,  // F16 largest subnormal, F16 largest finite
  };
  if (element < std::size(kSpecial)) return kSpecial[element];
  // Then an odd multiplier walks all 65536 patterns as the index grows.
  return static_cast<uint16_t>((element * 40503u + tensor_index * 977u) & 0xFFFFu);
}

std::vector<RawTensor> ModelTensors(const engine::ModelConfig& config, absl::string_view dtype) {
  std::vector<RawTensor> out;
  const std::vector<engine::TensorSpec> specs = config.ExpectedTensors();
  for (size_t t = 0; t < specs.size(); ++t) {
    const size_t n = ElementCount(specs[t].shape);
    RawTensor raw{specs[t].name, std::string(dtype), specs[t].shape, ""};
    if (dtype == "F16" || dtype == "BF16") {
      std::vector<uint16_t> bits(n);
      for (size_t i = 0; i < n; ++i) bits[i] = TestBits(t, i);
      raw.bytes = U16Bytes(bits);
    } else if (dtype == "F64") {
      std::vector<double> values(n);
      for (size_t i = 0; i < n; ++i) values[i] = TestValue(t, i);
      raw.bytes = LittleEndianBytes(values);
    } else {
      std::vector<float> values(n);
      for (size_t i = 0; i < n; ++i) values[i] = TestValue(t, i);
      raw.bytes = F32Bytes(values);
    }
    out.push_back(std::move(raw));
  }
  return out;
}

std::string SmallConfigJson() {
  return R"({
  "architecture": "polysketchformer",
  "vocab_size": 256,
  "d_model": 8,
  "n_layers": 3,
  "n_heads": 2,
  "d_ff": 16,
  "max_seq_len": 64,
  "norm_eps": 1e-05,
  "layers": [
    {"kind": "polysketch", "sketch": "random", "sketch_size": 4, "local_exact": true,
     "block_size": 4},
    {"kind": "polysketch", "sketch": "learned", "sketch_size": 2, "local_exact": false},
    {"kind": "sparse_fixed", "chunk": 4, "summary": 2}
  ],
  "format_version": 1,
  "tokenizer": {"type": "bytes"},
  "torch_dtype": "f32"
}
)";
}

void WriteModelDir(const std::string& dir, absl::string_view config_json,
                   const std::vector<RawTensor>& tensors) {
  WriteFile(dir + "/config.json", config_json);
  WriteFile(dir + "/model.safetensors", SafetensorsBytes(tensors));
}

}  // namespace ps::test
