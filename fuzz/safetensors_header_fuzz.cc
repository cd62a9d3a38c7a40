// Fuzz target: the JSON header of a safetensors file. The input is
//   [4 bytes: data section size, little-endian, taken modulo kMaxDataBytes] [header text]
// and the harness writes the 8-byte length itself, so that every mutation reaches the JSON and
// entry checks instead of failing the length check (safetensors_file_fuzz covers that part).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <absl/strings/string_view.h>

#include "fuzz/safetensors_invariants.h"
#include "server/engine/model_io/safetensors.h"

namespace {
// Data sections up to 64 KiB: room for many small tensors while each run stays cheap.
constexpr uint32_t kMaxDataBytes = 64 << 10;
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t data_bytes;
  std::memcpy(&data_bytes, data, 4);
  data_bytes %= kMaxDataBytes + 1;
  const absl::string_view header(reinterpret_cast<const char*>(data) + 4, size - 4);

  // A data section that is not all zeros, so that conversions see varied values; built once.
  static const std::string* const kData = [] {
    auto* s = new std::string(kMaxDataBytes, '\0');
    for (uint32_t i = 0; i < kMaxDataBytes; ++i) (*s)[i] = static_cast<char>(i * 131 + 7);
    return s;
  }();

  std::string file(8, '\0');
  const uint64_t header_bytes = header.size();
  std::memcpy(file.data(), &header_bytes, 8);  // little-endian host (safetensors.h)
  file.reserve(8 + header.size() + data_bytes);
  file.append(header.data(), header.size());
  file.append(*kData, 0, data_bytes);

  absl::StatusOr<ps::engine::SafetensorsFile> parsed =
      ps::engine::SafetensorsFile::FromBytes("header.safetensors", file);
  if (!parsed.ok()) {
    ps::fuzz::CheckSafetensorsError(parsed.status(), "header.safetensors: ");
    return 0;
  }
  ps::fuzz::CheckSafetensorsInvariants(*parsed, file);
  return 0;
}
