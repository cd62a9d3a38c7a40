// A validating reader of safetensors files (docs/model-format.md, model.safetensors): the file is
// memory-mapped, its header parsed and checked completely at Open(), and tensors are handed out
// as views of the mapped bytes. Converting to a compute dtype is the caller's business (see
// ReadFloat32 and weights.h).
#ifndef POLYSKETCH_SERVER_ENGINE_SAFETENSORS_H_
#define POLYSKETCH_SERVER_ENGINE_SAFETENSORS_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "base/mapped_file.h"

namespace ps::engine {

// safetensors stores little-endian data; this reader reinterprets it in place.
static_assert(std::endian::native == std::endian::little, "big-endian hosts are not supported");

// The JSON header may not be longer than this: far above any real model (a 1000-tensor header is
// ~100 KB) and small enough to parse safely.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100 << 20;  // same as train/modelio.py

// The dtypes this reader accepts (the ones train/modelio.py can write).
enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kU8 };
absl::string_view DTypeName(DType dtype);  // the header spelling: "F64", "F32", ...
size_t DTypeSize(DType dtype);             // bytes per element
bool IsFloating(DType dtype);              // F64, F32, F16, BF16

// One tensor of an open file. `data` points into the mapping, row-major (C order),
// little-endian, with no alignment promised (files from other writers need not pad): read it
// with memcpy, never by casting to float*.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // every dimension >= 0; empty for a scalar
  int64_t num_elements = 0;    // product of shape (1 for a scalar)
  const std::byte* data = nullptr;
  size_t num_bytes = 0;  // num_elements * DTypeSize(dtype)
};

// An open, validated safetensors file. Move-only. Views and metadata stay valid, at the same
// addresses, for as long as the object (or the one it was moved into) lives.
// Thread-safety: const methods may be called from any number of threads at once.
class SafetensorsFile {
 public:
  // Maps and validates `path`. NotFound when it does not exist (other open failures: the codes of
  // MappedFile::Open); every problem with the contents is DataLoss naming the file, and the
  // tensor where there is one:
  //   the file is shorter than 8 bytes, or the header length N (8-byte little-endian) exceeds
  //   kMaxSafetensorsHeaderBytes or the file;
  //   the header is not a JSON object (ParseStrictJson: also duplicate names, invalid UTF-8);
  //   "__metadata__" is not an object of strings (null counts as empty, as in train/modelio.py);
  //   an entry is not {"dtype", "shape", "data_offsets"} with nothing else; dtype not one of
  //   DType; shape not a list of integers in [0, 2^63); data_offsets not two integers
  //   [begin, end]; the element count or byte count overflows 64 bits; begin > end; end past the
  //   data section; end - begin != elements * dtype size; two non-empty ranges overlap.
  // Gaps between tensors and bytes after the last one are allowed (our writer pads).
  [[nodiscard]] static absl::StatusOr<SafetensorsFile> Open(std::string path);

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;

  const std::string& path() const { return file_.path(); }
  // All tensors, sorted by name.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr.
  const TensorView* Find(absl::string_view name) const;
  // The "__metadata__" strings (empty when absent).
  const std::map<std::string, std::string, std::less<>>& metadata() const { return metadata_; }
  // Bytes in the data section (the file minus 8 minus the header).
  size_t data_section_bytes() const { return data_section_bytes_; }

  // Copies tensor `name` out as float32 values in row-major order. F16 and BF16 convert exactly,
  // F64 rounds to nearest. NotFound when there is no such tensor; InvalidArgument when its dtype
  // is not floating. Errors name the file and the tensor.
  [[nodiscard]] absl::StatusOr<std::vector<float>> ReadFloat32(absl::string_view name) const;
  // Copies tensor `name` out as int32 values: I32 as stored, U8 widened, I64 when every value
  // fits (else OutOfRange). NotFound when there is no such tensor; InvalidArgument for floating
  // dtypes. Errors name the file and the tensor.
  [[nodiscard]] absl::StatusOr<std::vector<int32_t>> ReadInt32(absl::string_view name) const;

 private:
  SafetensorsFile() = default;

  MappedFile file_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string, std::less<>> metadata_;
  size_t data_section_bytes_ = 0;
};

// Converts `view` (a floating dtype: the caller checks IsFloating) into `out`, which must hold
// view.num_elements floats. Exact for F32, F16 and BF16; F64 rounds to nearest.
void ConvertToFloat32(const TensorView& view, float* out);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_SAFETENSORS_H_
