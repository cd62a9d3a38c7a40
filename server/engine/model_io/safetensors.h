// A validating reader of safetensors files (docs/model-format.md, model.safetensors): the file is
// memory-mapped (or, from FromBytes, copied), its header parsed and checked completely before the
// object exists, and tensors are handed out as views of those bytes. Converting to a compute dtype
// is the caller's business (see ReadFloat32 and weights.h).
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_IO_SAFETENSORS_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_IO_SAFETENSORS_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

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

  // The same validation of a whole file's bytes held in memory (the fuzz targets, and any caller
  // that did not read the file from disk), which are copied: the result owns them. `name` stands
  // in for the path in path() and in every message. Errors: DataLoss, as Open's.
  [[nodiscard]] static absl::StatusOr<SafetensorsFile> FromBytes(std::string name,
                                                                 absl::string_view bytes);

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;

  // The path given to Open, or the name given to FromBytes.
  const std::string& path() const { return path_; }
  // All tensors, sorted by name.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr.
  const TensorView* Find(absl::string_view name) const;
  // The "__metadata__" strings (empty when absent).
  const std::map<std::string, std::string, std::less<>>& metadata() const { return metadata_; }
  // The data section (the file after the 8-byte length and the header): every view's data lies
  // inside [data_section(), data_section() + data_section_bytes()).
  const std::byte* data_section() const { return data_section_; }
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

  // Validates `bytes` (the whole file) and fills tensors_ (views into `bytes`), metadata_ and
  // data_section_bytes_ of `out`. The one parser behind Open and FromBytes; the caller keeps
  // `bytes` alive in `out` at the same address.
  [[nodiscard]] static absl::Status Parse(absl::Span<const std::byte> bytes, SafetensorsFile& out);

  std::string path_;
  // Exactly one of these holds the bytes the views point into: a mapping (Open) or a heap copy
  // (FromBytes). Both keep their bytes at the same address when moved.
  MappedFile file_;
  std::vector<std::byte> buffer_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string, std::less<>> metadata_;
  const std::byte* data_section_ = nullptr;
  size_t data_section_bytes_ = 0;
};

// Converts `view` (a floating dtype: the caller checks IsFloating) into `out`, which must hold
// view.num_elements floats. Exact for F32, F16 and BF16; F64 rounds to nearest.
void ConvertToFloat32(const TensorView& view, float* out);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_IO_SAFETENSORS_H_
