// SafetensorsFile::Parse (behind Open and FromBytes) validates the whole header before any tensor
// byte is touched; the checks mirror train/modelio.py read_safetensors and go further where it is
// lenient (unknown entry fields, overlaps hidden behind an empty tensor, 64-bit overflow).
#include "server/engine/model_io/safetensors.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <nlohmann/json.hpp>

#include "base/half.h"
#include "base/status_macros.h"
#include "server/engine/model_io/json_util.h"

namespace ps::engine {
namespace {

using nlohmann::json;

struct DTypeInfo {
  absl::string_view name;
  DType dtype;
  size_t size;
  bool floating;
};
constexpr std::array<DTypeInfo, 7> kDTypes = {{
    {"F64", DType::kF64, 8, true},
    {"F32", DType::kF32, 4, true},
    {"F16", DType::kF16, 2, true},
    {"BF16", DType::kBF16, 2, true},
    {"I64", DType::kI64, 8, false},
    {"I32", DType::kI32, 4, false},
    {"U8", DType::kU8, 1, false},
}};

const DTypeInfo& Info(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  return kDTypes[0];  // unreachable: every enumerator is in the table
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Parses one header entry into `view` (all but `data`), with `begin`/`end` its data offsets.
// Returns the problem as text (the caller names file and tensor), or "" when it is fine.
std::string ParseEntry(const json& entry, TensorView& view, uint64_t& begin, uint64_t& end) {
  if (!entry.is_object())
    return absl::StrCat("header entry must be an object, got ", JsonForError(entry));
  for (const auto& [key, value] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return absl::StrCat("unknown header field ", JsonForError(json(key)));
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) return absl::StrCat("header field \"", key, "\" is missing");
  }

  const json& dtype = entry.at("dtype");
  const DTypeInfo* info = nullptr;
  for (const DTypeInfo& candidate : kDTypes) {
    if (dtype.is_string() && dtype.get_ref<const std::string&>() == candidate.name)
      info = &candidate;
  }
  if (info == nullptr) {
    std::vector<absl::string_view> names;
    for (const DTypeInfo& candidate : kDTypes) names.push_back(candidate.name);
    return absl::StrCat("dtype must be one of ", absl::StrJoin(names, ", "), ", got ",
                        JsonForError(dtype));
  }
  view.dtype = info->dtype;

  const json& shape = entry.at("shape");
  std::string bad_shape =
      absl::StrCat("shape must be a list of non-negative integers, got ", JsonForError(shape));
  if (!shape.is_array()) return bad_shape;
  uint64_t num_elements = 1;
  bool overflow = false;
  for (const json& dim : shape) {
    std::optional<int64_t> d = JsonToInt64(dim);
    if (!d.has_value() || *d < 0) return bad_shape;
    view.shape.push_back(*d);
    overflow |= __builtin_mul_overflow(num_elements, static_cast<uint64_t>(*d), &num_elements);
  }
  uint64_t num_bytes = 0;
  overflow |= __builtin_mul_overflow(num_elements, static_cast<uint64_t>(info->size), &num_bytes);
  if (overflow || num_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::StrCat("shape ", ShapeString(view.shape), " has too many elements");
  }
  view.num_elements = static_cast<int64_t>(num_elements);
  view.num_bytes = static_cast<size_t>(num_bytes);

  const json& offsets = entry.at("data_offsets");
  std::string bad_offsets = absl::StrCat(
      "data_offsets must be a list of two non-negative integers, got ", JsonForError(offsets));
  if (!offsets.is_array() || offsets.size() != 2) return bad_offsets;
  for (size_t i = 0; i < 2; ++i) {
    std::optional<int64_t> v = JsonToInt64(offsets[i]);
    if (!v.has_value() || *v < 0) return bad_offsets;
    (i == 0 ? begin : end) = static_cast<uint64_t>(*v);
  }
  return "";
}

}  // namespace

absl::string_view DTypeName(DType dtype) { return Info(dtype).name; }
size_t DTypeSize(DType dtype) { return Info(dtype).size; }
bool IsFloating(DType dtype) { return Info(dtype).floating; }

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(std::string path) {
  PS_ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(std::move(path)));
  SafetensorsFile out;
  out.path_ = file.path();
  out.file_ = std::move(file);  // the mapping stays at its address: the views may point into it
  PS_RETURN_IF_ERROR(Parse(out.file_.bytes(), out));
  return out;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::FromBytes(std::string name,
                                                           absl::string_view bytes) {
  SafetensorsFile out;
  out.path_ = std::move(name);
  const auto* begin = reinterpret_cast<const std::byte*>(bytes.data());
  out.buffer_.assign(begin, begin + bytes.size());
  PS_RETURN_IF_ERROR(Parse(out.buffer_, out));
  return out;
}

absl::Status SafetensorsFile::Parse(absl::Span<const std::byte> file, SafetensorsFile& out) {
  const std::string& p = out.path_;
  auto corrupt = [&p](auto&&... parts) {
    return absl::DataLossError(absl::StrCat(p, ": ", parts...));
  };
  if (file.size() < 8) {
    return corrupt(file.size(), " bytes, too short for a safetensors header");
  }
  uint64_t header_bytes;
  std::memcpy(&header_bytes, file.data(), 8);  // little-endian (static_assert in the header)
  if (header_bytes > file.size() - 8) {
    return corrupt("header length ", header_bytes, " exceeds the file (", file.size(), " bytes)");
  }
  if (header_bytes > kMaxSafetensorsHeaderBytes) {
    return corrupt("header length ", header_bytes, " exceeds the limit of ",
                   kMaxSafetensorsHeaderBytes, " bytes");
  }
  const absl::string_view header_text(reinterpret_cast<const char*>(file.data()) + 8,
                                      static_cast<size_t>(header_bytes));
  absl::StatusOr<json> header = ParseStrictJson(header_text);
  if (!header.ok()) return corrupt("header is not valid JSON: ", header.status().message());
  if (!header->is_object()) {
    return corrupt("header must be a JSON object, got ", JsonForError(*header));
  }

  const std::byte* data_section = file.data() + 8 + header_bytes;
  out.data_section_ = data_section;
  out.data_section_bytes_ = file.size() - 8 - static_cast<size_t>(header_bytes);

  struct Range {
    uint64_t begin, end;
    size_t index;  // into out.tensors_
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : header->items()) {
    if (name == "__metadata__") {
      if (entry.is_null()) continue;
      bool ok = entry.is_object();
      for (auto it = entry.begin(); ok && it != entry.end(); ++it) ok = it->is_string();
      if (!ok)
        return corrupt("__metadata__ must map strings to strings, got ", JsonForError(entry));
      for (auto it = entry.begin(); it != entry.end(); ++it) {
        out.metadata_.emplace(it.key(), it->get<std::string>());
      }
      continue;
    }
    TensorView view;
    view.name = name;
    uint64_t begin = 0, end = 0;
    std::string problem = ParseEntry(entry, view, begin, end);
    const std::string tensor = absl::StrCat("tensor ", JsonForError(json(name), 200), ": ");
    if (!problem.empty()) return corrupt(tensor, problem);
    if (begin > end) {
      return corrupt(tensor, "data_offsets [", begin, ", ", end, "] are out of order");
    }
    if (end > out.data_section_bytes_) {
      return corrupt(tensor, "data_offsets [", begin, ", ", end, "] end past the data section (",
                     out.data_section_bytes_, " bytes)");
    }
    if (end - begin != view.num_bytes) {
      return corrupt(tensor, "data_offsets [", begin, ", ", end, "] hold ", end - begin,
                     " bytes, but shape ", ShapeString(view.shape), " of ", DTypeName(view.dtype),
                     " needs ", view.num_bytes);
    }
    view.data = data_section + begin;
    if (begin != end) ranges.push_back({begin, end, out.tensors_.size()});
    out.tensors_.push_back(std::move(view));
  }

  // Non-empty ranges must be disjoint. Sorted by start, each range must begin at or after the
  // furthest end so far (checking only neighbours would miss [0,10) vs [5,6) around [2,3)).
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Range* furthest = nullptr;
  for (const Range& r : ranges) {
    if (furthest != nullptr && r.begin < furthest->end) {
      const TensorView& a = out.tensors_[furthest->index];
      const TensorView& b = out.tensors_[r.index];
      return corrupt("tensors ", JsonForError(json(a.name), 200), " [", furthest->begin, ", ",
                     furthest->end, "] and ", JsonForError(json(b.name), 200), " [", r.begin, ", ",
                     r.end, "] overlap in the data section");
    }
    if (furthest == nullptr || r.end > furthest->end) furthest = &r;
  }

  // nlohmann's objects iterate in key order, so tensors_ is already sorted by name.
  return absl::OkStatus();
}

const TensorView* SafetensorsFile::Find(absl::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorView& t, absl::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

void ConvertToFloat32(const TensorView& view, float* out) {
  const size_t n = static_cast<size_t>(view.num_elements);
  if (n == 0) return;  // out may be nullptr (an empty vector's data()): memcpy must not see it
  switch (view.dtype) {
    case DType::kF32:
      std::memcpy(out, view.data, n * sizeof(float));
      return;
    case DType::kF16:
    case DType::kBF16: {
      const bool half = view.dtype == DType::kF16;
      for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, view.data + 2 * i, 2);
        out[i] = half ? HalfBitsToFloat(bits) : BFloat16BitsToFloat(bits);
      }
      return;
    }
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, view.data + 8 * i, 8);
        out[i] = static_cast<float>(v);  // IEEE: rounds to nearest, overflows to +-inf
      }
      return;
    case DType::kI64:
    case DType::kI32:
    case DType::kU8:
      break;  // not floating: the caller's precondition
  }
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat32(absl::string_view name) const {
  const TensorView* view = Find(name);
  if (view == nullptr) return absl::NotFoundError(absl::StrCat(path(), ": no tensor ", name));
  if (!IsFloating(view->dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(path(), ": tensor ", name, " is ",
                                                   DTypeName(view->dtype), ", not floating point"));
  }
  std::vector<float> out(static_cast<size_t>(view->num_elements));
  ConvertToFloat32(*view, out.data());
  return out;
}

absl::StatusOr<std::vector<int32_t>> SafetensorsFile::ReadInt32(absl::string_view name) const {
  const TensorView* view = Find(name);
  if (view == nullptr) return absl::NotFoundError(absl::StrCat(path(), ": no tensor ", name));
  const size_t n = static_cast<size_t>(view->num_elements);
  std::vector<int32_t> out(n);
  switch (view->dtype) {
    case DType::kI32:
      if (n != 0) std::memcpy(out.data(), view->data, n * sizeof(int32_t));
      return out;
    case DType::kU8:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(view->data[i]);
      return out;
    case DType::kI64:
      for (size_t i = 0; i < n; ++i) {
        int64_t v;
        std::memcpy(&v, view->data + 8 * i, 8);
        if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
          return absl::OutOfRangeError(absl::StrCat(path(), ": tensor ", name, " element ", i,
                                                    " = ", v, " does not fit int32"));
        }
        out[i] = static_cast<int32_t>(v);
      }
      return out;
    case DType::kF64:
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(path(), ": tensor ", name, " is ",
                                                 DTypeName(view->dtype), ", not an integer dtype"));
}

}  // namespace ps::engine
