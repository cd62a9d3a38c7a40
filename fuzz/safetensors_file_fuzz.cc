// Fuzz target: a whole safetensors file (8-byte header length, JSON header, data section) from
// untrusted bytes, through SafetensorsFile::FromBytes, the parser behind Open. An accepted file
// must meet every invariant of safetensors.h; a refused one must be DataLoss naming the file.
#include <cstddef>
#include <cstdint>

#include <absl/strings/string_view.h>

#include "fuzz/safetensors_invariants.h"
#include "server/engine/model_io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<ps::engine::SafetensorsFile> file =
      ps::engine::SafetensorsFile::FromBytes("fuzz.safetensors", bytes);
  if (!file.ok()) {
    ps::fuzz::CheckSafetensorsError(file.status(), "fuzz.safetensors: ");
    return 0;
  }
  ps::fuzz::CheckSafetensorsInvariants(*file, bytes);
  return 0;
}
