// Writers of safetensors files and model directories for tests, independent of the reader under
// test: they lay files out like train/modelio.py write_safetensors (names sorted, header padded
// with spaces, every tensor 8-byte aligned), or take any header text to build broken files.
#ifndef POLYSKETCH_TESTS_TESTING_MODEL_WRITER_H_
#define POLYSKETCH_TESTS_TESTING_MODEL_WRITER_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <absl/strings/string_view.h>

#include "server/engine/model_io/model_config.h"

namespace ps::test {

// One tensor as a writer sees it: the header fields and the raw little-endian bytes.
struct RawTensor {
  std::string name;
  std::string dtype;  // header spelling, written as given ("F32", or "F8" to test refusal)
  std::vector<int64_t> shape;
  std::string bytes;
};

// The bytes of a safetensors file holding `tensors` (written in name order, offsets computed
// from the byte sizes given, so a RawTensor whose bytes disagree with its shape makes a corrupt
// file) and `metadata` (omitted when empty).
std::string SafetensorsBytes(const std::vector<RawTensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {});

// The bytes of a file with this exact header text and data section.
std::string SafetensorsWithHeader(absl::string_view header, absl::string_view data);

// Little-endian bytes of values.
std::string F32Bytes(const std::vector<float>& values);
std::string U16Bytes(const std::vector<uint16_t>& values);
std::string I32Bytes(const std::vector<int32_t>& values);

// Every tensor `config` expects (ModelConfig::ExpectedTensors), filled with deterministic values:
// element i of the t-th tensor is TestValue(t, i) for "F32" and "F64", and has the bit pattern
// TestBits(t, i) for "F16" and "BF16" (the first 12 elements of every tensor are signed zeros,
// infinities, NaNs and subnormals of both formats).
std::vector<RawTensor> ModelTensors(const engine::ModelConfig& config, absl::string_view dtype);
float TestValue(size_t tensor_index, size_t element);
uint16_t TestBits(size_t tensor_index, size_t element);

// A small valid config.json (D 8, H 2, V 256, F 16, 3 layers: polysketch random with
// local_exact, polysketch learned, sparse_fixed) that tests modify.
std::string SmallConfigJson();

// Writes <dir>/config.json and <dir>/model.safetensors.
void WriteModelDir(const std::string& dir, absl::string_view config_json,
                   const std::vector<RawTensor>& tensors);

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_MODEL_WRITER_H_
