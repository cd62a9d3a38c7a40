// What every SafetensorsFile that validated must satisfy, checked by the safetensors fuzz targets
// against the bytes it was parsed from (safetensors.h states these as the contract).
#ifndef POLYSKETCH_FUZZ_SAFETENSORS_INVARIANTS_H_
#define POLYSKETCH_FUZZ_SAFETENSORS_INVARIANTS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/match.h>
#include <absl/strings/string_view.h>

#include "fuzz/fuzz_check.h"
#include "server/engine/model_io/safetensors.h"

namespace ps::fuzz {

// `file` came from SafetensorsFile::FromBytes(name, bytes).
inline void CheckSafetensorsInvariants(const engine::SafetensorsFile& file,
                                       absl::string_view bytes) {
  using engine::DType;
  using engine::TensorView;
  uint64_t header_bytes = 0;
  PS_FUZZ_CHECK(bytes.size() >= 8, "accepted a file of %zu bytes", bytes.size());
  std::memcpy(&header_bytes, bytes.data(), 8);
  PS_FUZZ_CHECK(header_bytes <= engine::kMaxSafetensorsHeaderBytes, "header too long");
  PS_FUZZ_CHECK(file.data_section_bytes() == bytes.size() - 8 - header_bytes, "data section size");

  const std::byte* section = file.data_section();
  const auto* stored = reinterpret_cast<const std::byte*>(bytes.data()) + 8 + header_bytes;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // non-empty tensors' [begin, end)
  for (size_t i = 0; i < file.tensors().size(); ++i) {
    const TensorView& t = file.tensors()[i];
    if (i > 0) {
      PS_FUZZ_CHECK(file.tensors()[i - 1].name < t.name, "tensors not sorted or not unique");
    }
    PS_FUZZ_CHECK(t.name != "__metadata__", "__metadata__ taken for a tensor");
    PS_FUZZ_CHECK(file.Find(t.name) == &t, "Find does not return the tensor");
    int64_t elements = 1;
    for (int64_t d : t.shape) {
      PS_FUZZ_CHECK(d >= 0, "negative dimension");
      elements *= d;  // cannot overflow: the parser refused shapes whose byte count does
    }
    PS_FUZZ_CHECK(elements == t.num_elements, "num_elements is not the product of the shape");
    PS_FUZZ_CHECK(t.num_bytes == static_cast<size_t>(t.num_elements) * engine::DTypeSize(t.dtype),
                  "num_bytes");
    PS_FUZZ_CHECK(t.data >= section, "tensor %s starts before the data section", t.name.c_str());
    const auto begin = static_cast<uint64_t>(t.data - section);
    PS_FUZZ_CHECK(begin + t.num_bytes <= file.data_section_bytes(),
                  "tensor %s ends past the data section", t.name.c_str());
    // The view shows the file's bytes at its offset (the parser's copy, not other memory).
    PS_FUZZ_CHECK(t.num_bytes == 0 || std::memcmp(t.data, stored + begin, t.num_bytes) == 0,
                  "tensor %s does not show the stored bytes", t.name.c_str());
    if (t.num_bytes != 0) ranges.emplace_back(begin, begin + t.num_bytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    PS_FUZZ_CHECK(ranges[i].first >= ranges[i - 1].second, "overlapping tensors accepted");
  }

  // Every accessor must answer with data or a clear error, never crash; and the copies must be
  // the stored bytes.
  for (const TensorView& t : file.tensors()) {
    absl::StatusOr<std::vector<float>> f = file.ReadFloat32(t.name);
    if (engine::IsFloating(t.dtype)) {
      PS_FUZZ_CHECK(f.ok(), "ReadFloat32 of a floating tensor failed");
      PS_FUZZ_CHECK(f->size() == static_cast<size_t>(t.num_elements), "ReadFloat32 size");
      if (t.dtype == DType::kF32 && t.num_bytes != 0) {  // F32 is copied bit for bit
        PS_FUZZ_CHECK(std::memcmp(f->data(), t.data, t.num_bytes) == 0, "F32 copy differs");
      }
    } else {
      PS_FUZZ_CHECK(f.status().code() == absl::StatusCode::kInvalidArgument,
                    "ReadFloat32 of an integer tensor");
    }
    absl::StatusOr<std::vector<int32_t>> n = file.ReadInt32(t.name);
    if (t.dtype == DType::kI32 || t.dtype == DType::kU8) {
      PS_FUZZ_CHECK(n.ok() && n->size() == static_cast<size_t>(t.num_elements), "ReadInt32");
    } else if (t.dtype == DType::kI64) {
      PS_FUZZ_CHECK(n.ok() || n.status().code() == absl::StatusCode::kOutOfRange, "ReadInt32 I64");
    } else {
      PS_FUZZ_CHECK(n.status().code() == absl::StatusCode::kInvalidArgument,
                    "ReadInt32 of a floating tensor");
    }
  }
  PS_FUZZ_CHECK(file.ReadFloat32("__metadata__").status().code() == absl::StatusCode::kNotFound,
                "__metadata__ readable as a tensor");
}

// An error from parsing untrusted bytes: DataLoss, prefixed with the name given.
inline void CheckSafetensorsError(const absl::Status& status, absl::string_view name) {
  PS_FUZZ_CHECK(status.code() == absl::StatusCode::kDataLoss, "code %d, not DataLoss",
                static_cast<int>(status.code()));
  PS_FUZZ_CHECK(absl::StartsWith(status.message(), name), "message does not name the file");
}

}  // namespace ps::fuzz

#endif  // POLYSKETCH_FUZZ_SAFETENSORS_INVARIANTS_H_
