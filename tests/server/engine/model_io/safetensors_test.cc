// SafetensorsFile: reading every dtype, files from writers that do not pad, and every way a file
// can be corrupt (truncation at every byte, bad lengths, headers, entries, offsets, overlaps).
#include "server/engine/model_io/safetensors.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <fcntl.h>
#include <limits>
#include <string>
#include <unistd.h>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/half.h"
#include "tests/testing/files.h"
#include "tests/testing/model_writer.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::nlohmann::json;
using ::ps::test::F32Bytes;
using ::ps::test::I32Bytes;
using ::ps::test::IsOk;
using ::ps::test::RawTensor;
using ::ps::test::SafetensorsBytes;
using ::ps::test::SafetensorsWithHeader;
using ::ps::test::StatusIs;
using ::ps::test::TempDir;
using ::ps::test::U16Bytes;
using ::ps::test::WriteFile;
using ::testing::ElementsAre;
using ::testing::Pair;

constexpr absl::StatusCode kDataLoss = absl::StatusCode::kDataLoss;

template <typename T>
std::string Bytes(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// A file with one tensor of every dtype, and the special values that must survive.
std::vector<RawTensor> EveryDtype() {
  const float inf = std::numeric_limits<float>::infinity();
  return {
      {"f32", "F32", {2, 3}, F32Bytes({1.5f, -2.0f, 0.0f, -0.0f, inf, 1e-40f})},
      {"f16", "F16", {4}, U16Bytes({0x3C00, 0x0001, 0xFC00, 0x7E01})},  // 1, 2^-24, -inf, NaN
      {"bf16", "BF16", {2, 1}, U16Bytes({0x3F80, 0xC040})},             // 1, -3
      {"f64", "F64", {2}, Bytes<double>({0.1, -1e300})},
      {"i64", "I64", {3}, Bytes<int64_t>({-(int64_t{1} << 31), 0, (int64_t{1} << 31) - 1})},
      {"i32", "I32", {2}, I32Bytes({-7, 2147483647})},
      {"u8", "U8", {3}, std::string("\x00\x01\xff", 3)},
      {"scalar", "F32", {}, F32Bytes({2.5f})},
      {"empty", "F32", {0, 4}, ""},
      {"empty_i32", "I32", {0}, ""},
  };
}

TEST(SafetensorsTest, ReadsEveryDtype) {
  TempDir dir;
  WriteFile(dir.Join("t.safetensors"),
            SafetensorsBytes(EveryDtype(), {{"format", "polysketch"}, {"n", "3"}}));
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile file, SafetensorsFile::Open(dir.Join("t.safetensors")));
  EXPECT_EQ(file.path(), dir.Join("t.safetensors"));
  EXPECT_THAT(file.metadata(), ElementsAre(Pair("format", "polysketch"), Pair("n", "3")));

  std::vector<std::string> names;
  for (const TensorView& t : file.tensors()) names.push_back(t.name);
  EXPECT_THAT(names, ElementsAre("bf16", "empty", "empty_i32", "f16", "f32", "f64", "i32", "i64",
                                 "scalar", "u8"));

  const TensorView* f32 = file.Find("f32");
  ASSERT_NE(f32, nullptr);
  EXPECT_EQ(f32->dtype, DType::kF32);
  EXPECT_EQ(f32->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f32->num_elements, 6);
  EXPECT_EQ(f32->num_bytes, 24u);
  EXPECT_EQ(std::memcmp(
                f32->data,
                F32Bytes({1.5f, -2.0f, 0.0f, -0.0f, std::numeric_limits<float>::infinity(), 1e-40f})
                    .data(),
                24),
            0);
  EXPECT_EQ(file.Find("f3"), nullptr);
  EXPECT_EQ(file.Find("f32x"), nullptr);

  PS_ASSERT_OK_AND_ASSIGN(std::vector<float> v, file.ReadFloat32("f32"));
  ASSERT_EQ(v.size(), 6u);
  EXPECT_EQ(v[0], 1.5f);
  EXPECT_TRUE(std::signbit(v[3]));
  EXPECT_EQ(v[4], std::numeric_limits<float>::infinity());
  EXPECT_EQ(v[5], 1e-40f);  // float subnormal kept

  PS_ASSERT_OK_AND_ASSIGN(v, file.ReadFloat32("f16"));
  ASSERT_EQ(v.size(), 4u);
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], std::ldexp(1.0f, -24));
  EXPECT_EQ(v[2], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(v[3]));

  PS_ASSERT_OK_AND_ASSIGN(v, file.ReadFloat32("bf16"));
  EXPECT_THAT(v, ElementsAre(1.0f, -3.0f));
  PS_ASSERT_OK_AND_ASSIGN(v, file.ReadFloat32("f64"));
  EXPECT_THAT(v, ElementsAre(0.1f, -std::numeric_limits<float>::infinity()));
  PS_ASSERT_OK_AND_ASSIGN(v, file.ReadFloat32("scalar"));
  EXPECT_THAT(v, ElementsAre(2.5f));
  EXPECT_EQ(file.Find("scalar")->num_elements, 1);
  PS_ASSERT_OK_AND_ASSIGN(v, file.ReadFloat32("empty"));
  EXPECT_TRUE(v.empty());

  PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> ints, file.ReadInt32("empty_i32"));
  EXPECT_TRUE(ints.empty());
  PS_ASSERT_OK_AND_ASSIGN(ints, file.ReadInt32("i32"));
  EXPECT_THAT(ints, ElementsAre(-7, 2147483647));
  PS_ASSERT_OK_AND_ASSIGN(ints, file.ReadInt32("u8"));
  EXPECT_THAT(ints, ElementsAre(0, 1, 255));
  PS_ASSERT_OK_AND_ASSIGN(ints, file.ReadInt32("i64"));
  EXPECT_THAT(ints, ElementsAre(-2147483648, 0, 2147483647));
}

// FromBytes is Open without the file: the same parser, so the same views, metadata and errors.
TEST(SafetensorsTest, FromBytesMatchesOpen) {
  const std::string bytes = SafetensorsBytes(EveryDtype(), {{"format", "polysketch"}});
  TempDir dir;
  WriteFile(dir.Join("t.safetensors"), bytes);
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile opened, SafetensorsFile::Open(dir.Join("t.safetensors")));
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile held, SafetensorsFile::FromBytes("in memory", bytes));
  EXPECT_EQ(held.path(), "in memory");
  EXPECT_EQ(held.metadata(), opened.metadata());
  EXPECT_EQ(held.data_section_bytes(), opened.data_section_bytes());
  ASSERT_EQ(held.tensors().size(), opened.tensors().size());
  for (size_t i = 0; i < held.tensors().size(); ++i) {
    const TensorView& a = held.tensors()[i];
    const TensorView& b = opened.tensors()[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.shape, b.shape);
    EXPECT_EQ(a.data - held.data_section(), b.data - opened.data_section()) << a.name;
    EXPECT_EQ(std::memcmp(a.data, b.data, a.num_bytes), 0) << a.name;
  }

  // The copy is the object's own: the caller's buffer may go away, and moves keep the views.
  std::string scratch = bytes;
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile copy, SafetensorsFile::FromBytes("scratch", scratch));
  scratch.assign(scratch.size(), '\xff');
  SafetensorsFile moved = std::move(copy);
  PS_ASSERT_OK_AND_ASSIGN(std::vector<float> v, moved.ReadFloat32("scalar"));
  EXPECT_THAT(v, ElementsAre(2.5f));

  EXPECT_THAT(SafetensorsFile::FromBytes("short", bytes.substr(0, 7)),
              StatusIs(kDataLoss, "short: 7 bytes, too short for a safetensors header"));
  EXPECT_THAT(SafetensorsFile::FromBytes("cut", bytes.substr(0, 20)),
              StatusIs(kDataLoss, "cut: header length"));
}

TEST(SafetensorsTest, ReadErrorsNameFileAndTensor) {
  TempDir dir;
  const std::string path = dir.Join("t.safetensors");
  WriteFile(path, SafetensorsBytes({{"i32", "I32", {1}, I32Bytes({1})},
                                    {"f32", "F32", {1}, F32Bytes({1})},
                                    {"big", "I64", {2}, Bytes<int64_t>({1, int64_t{1} << 40})}}));
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile file, SafetensorsFile::Open(path));
  EXPECT_THAT(file.ReadFloat32("absent"),
              StatusIs(absl::StatusCode::kNotFound, path + ": no tensor absent"));
  EXPECT_THAT(file.ReadInt32("absent"), StatusIs(absl::StatusCode::kNotFound, "absent"));
  EXPECT_THAT(file.ReadFloat32("i32"),
              StatusIs(absl::StatusCode::kInvalidArgument, path + ": tensor i32 is I32"));
  EXPECT_THAT(file.ReadInt32("f32"),
              StatusIs(absl::StatusCode::kInvalidArgument, path + ": tensor f32 is F32"));
  EXPECT_THAT(file.ReadInt32("big"),
              StatusIs(absl::StatusCode::kOutOfRange, "tensor big element 1 = 1099511627776"));
}

TEST(SafetensorsTest, ReadsUnpaddedFilesFromOtherWriters) {
  // No header padding, tensors packed back to back at odd offsets, a gap and trailing bytes.
  TempDir dir;
  const json header = {
      {"a", {{"dtype", "U8"}, {"shape", {3}}, {"data_offsets", {0, 3}}}},
      {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {3, 11}}}},
      {"c", {{"dtype", "F16"}, {"shape", {1}}, {"data_offsets", {14, 16}}}},
  };
  const std::string data = std::string("\x01\x02\x03", 3) + F32Bytes({3.25f, -1.0f}) + "gap" +
                           U16Bytes({0xC000}) + "tail";
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // data section 8-byte aligned
  WriteFile(dir.Join("t"), SafetensorsWithHeader(header_text, data));
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile file, SafetensorsFile::Open(dir.Join("t")));
  EXPECT_TRUE(file.metadata().empty());
  EXPECT_EQ(file.data_section_bytes(), data.size());
  EXPECT_NE(reinterpret_cast<uintptr_t>(file.Find("b")->data) % 4, 0u);  // unaligned on purpose
  PS_ASSERT_OK_AND_ASSIGN(std::vector<float> b, file.ReadFloat32("b"));
  EXPECT_THAT(b, ElementsAre(3.25f, -1.0f));
  PS_ASSERT_OK_AND_ASSIGN(std::vector<float> c, file.ReadFloat32("c"));
  EXPECT_THAT(c, ElementsAre(-2.0f));
}

TEST(SafetensorsTest, EmptyHeaderAndNullMetadata) {
  TempDir dir;
  WriteFile(dir.Join("t"), SafetensorsWithHeader("{}", ""));
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile file, SafetensorsFile::Open(dir.Join("t")));
  EXPECT_TRUE(file.tensors().empty());
  WriteFile(dir.Join("t"), SafetensorsWithHeader(R"({"__metadata__": null})", ""));
  EXPECT_THAT(SafetensorsFile::Open(dir.Join("t")), IsOk());  // as train/modelio.py
}

TEST(SafetensorsTest, EmptyTensorsMayShareOffsets) {
  TempDir dir;
  const json header = {
      {"a", {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {4, 4}}}},
      {"b", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}},
      {"c", {{"dtype", "I32"}, {"shape", {3, 0}}, {"data_offsets", {2, 2}}}},  // inside b
      {"d", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}},     // touches b
  };
  WriteFile(dir.Join("t"), SafetensorsWithHeader(header.dump(), std::string(8, '\0')));
  EXPECT_THAT(SafetensorsFile::Open(dir.Join("t")), IsOk());
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  TempDir dir;
  EXPECT_THAT(SafetensorsFile::Open(dir.Join("absent.safetensors")),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("absent.safetensors")));
}

TEST(SafetensorsTest, EveryTruncationIsDataLoss) {
  // The last tensor ends exactly at the end of the file, so every cut removes needed bytes.
  const std::string full =
      SafetensorsBytes({{"a.weight", "F32", {3, 2}, F32Bytes({1, 2, 3, 4, 5, 6})},
                        {"b.bias", "F16", {4}, U16Bytes({1, 2, 3, 4})}},
                       {{"format", "polysketch"}});
  TempDir dir;
  const std::string path = dir.Join("cut.safetensors");
  uint64_t header_bytes;
  std::memcpy(&header_bytes, full.data(), 8);
  for (size_t size = 0; size < full.size(); ++size) {
    WriteFile(path, full.substr(0, size));
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(path);
    ASSERT_THAT(file, StatusIs(kDataLoss, path + ": ")) << "cut at " << size;
    if (size < 8) {
      EXPECT_THAT(file, StatusIs(kDataLoss, "too short for a safetensors header"));
    } else if (size < 8 + header_bytes) {
      EXPECT_THAT(file, StatusIs(kDataLoss, "exceeds the file")) << size;
    } else {  // the header is whole: the message names the tensor cut off
      EXPECT_THAT(file, StatusIs(kDataLoss, "end past the data section")) << size;
      EXPECT_THAT(file, StatusIs(kDataLoss, size < full.size() - 8 ? "\"a.weight\"" : "\"b.bias\""))
          << size;
    }
  }
  WriteFile(path, full);
  EXPECT_THAT(SafetensorsFile::Open(path), IsOk());
}

TEST(SafetensorsTest, HeaderLengthPastTheFileOrTheLimit) {
  TempDir dir;
  const std::string path = dir.Join("t");
  for (uint64_t n : {uint64_t{3}, uint64_t{1} << 40, ~uint64_t{0}}) {
    std::string bytes(8, '\0');
    std::memcpy(bytes.data(), &n, 8);
    WriteFile(path, bytes + "{}");
    EXPECT_THAT(
        SafetensorsFile::Open(path),
        StatusIs(kDataLoss, absl::StrCat(path, ": header length ", n, " exceeds the file")));
  }
  // A (sparse) file larger than the limit, whose header length is just past it.
  const uint64_t n = kMaxSafetensorsHeaderBytes + 1;
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  WriteFile(path, bytes);
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(n + 64)), 0);
  EXPECT_THAT(SafetensorsFile::Open(path), StatusIs(kDataLoss, "exceeds the limit of 104857600"));
}

// Opens a file with this header text and a 64-byte data section; returns its status.
absl::Status OpenWithHeader(const std::string& header, size_t data_bytes = 64) {
  TempDir dir;
  WriteFile(dir.Join("h.safetensors"),
            SafetensorsWithHeader(header, std::string(data_bytes, '\0')));
  absl::Status status = SafetensorsFile::Open(dir.Join("h.safetensors")).status();
  if (!status.ok() && status.message().find(dir.Join("h.safetensors")) == absl::string_view::npos) {
    ADD_FAILURE() << "message does not name the file: " << status;
  }
  return status;
}

// A header of one tensor "w" with this entry.
std::string OneTensor(const json& entry) { return json{{"w", entry}}.dump(); }

TEST(SafetensorsTest, RefusesHeadersThatAreNotJsonObjects) {
  EXPECT_THAT(OpenWithHeader("{\"w\": "), StatusIs(kDataLoss, "header is not valid JSON"));
  EXPECT_THAT(OpenWithHeader("not json"), StatusIs(kDataLoss, "header is not valid JSON"));
  EXPECT_THAT(OpenWithHeader("{\"\xFF\": 1}"), StatusIs(kDataLoss, "header is not valid JSON"));
  EXPECT_THAT(OpenWithHeader(""), StatusIs(kDataLoss, "header is not valid JSON"));
  // Padding with NULs instead of spaces (train/modelio.py refuses it too).
  EXPECT_THAT(OpenWithHeader(std::string("{}\0\0\0\0\0\0", 8)),
              StatusIs(kDataLoss, "header is not valid JSON: NUL byte at offset 2"));
  EXPECT_THAT(OpenWithHeader("[1, 2]"),
              StatusIs(kDataLoss, "header must be a JSON object, got [1,2]"));
  EXPECT_THAT(OpenWithHeader("\"w\""), StatusIs(kDataLoss, "header must be a JSON object"));
  const std::string entry = R"({"dtype": "U8", "shape": [1], "data_offsets": [0, 1]})";
  EXPECT_THAT(OpenWithHeader(absl::StrCat("{\"w\": ", entry, ", \"w\": ", entry, "}")),
              StatusIs(kDataLoss, "duplicate key \"w\""));
}

TEST(SafetensorsTest, RefusesBadMetadata) {
  for (const char* bad : {R"({"__metadata__": {"n": 3}})", R"({"__metadata__": ["a"]})",
                          R"({"__metadata__": "x"})", R"({"__metadata__": {"a": null}})"}) {
    EXPECT_THAT(OpenWithHeader(bad),
                StatusIs(kDataLoss, "__metadata__ must map strings to strings"))
        << bad;
  }
}

TEST(SafetensorsTest, RefusesBadEntries) {
  const json good = {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}};
  ASSERT_THAT(OpenWithHeader(OneTensor(good)), IsOk());

  auto with = [&](const char* key, const json& value) {
    json entry = good;
    entry[key] = value;
    return OneTensor(entry);
  };
  auto without = [&](const char* key) {
    json entry = good;
    entry.erase(key);
    return OneTensor(entry);
  };
  EXPECT_THAT(OpenWithHeader(OneTensor(json::array({1}))),
              StatusIs(kDataLoss, "tensor \"w\": header entry must be an object, got [1]"));
  EXPECT_THAT(OpenWithHeader(OneTensor("F32")), StatusIs(kDataLoss, "tensor \"w\": header entry"));
  EXPECT_THAT(OpenWithHeader(with("offsets", {0, 16})),
              StatusIs(kDataLoss, "tensor \"w\": unknown header field \"offsets\""));
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    EXPECT_THAT(
        OpenWithHeader(without(key)),
        StatusIs(kDataLoss, absl::StrCat("tensor \"w\": header field \"", key, "\" is missing")));
  }
  for (const json& dtype :
       {json("F8"), json("f32"), json("BOOL"), json("U16"), json(4), json(nullptr)}) {
    EXPECT_THAT(
        OpenWithHeader(with("dtype", dtype)),
        StatusIs(kDataLoss, absl::StrCat("tensor \"w\": dtype must be one of F64, F32, F16, "
                                         "BF16, I64, I32, U8, got ",
                                         dtype.dump())));
  }
  // json::array for one-element lists: json({x}) is the scalar x (braces around a scalar).
  for (const json& shape : {json({2, -2}), json({2.0, 2}), json::array({true}), json("2"), json(4),
                            json::array({nullptr}), json::parse("[9223372036854775808]")}) {
    EXPECT_THAT(OpenWithHeader(with("shape", shape)),
                StatusIs(kDataLoss, "tensor \"w\": shape must be a list of non-negative integers"))
        << shape.dump();
  }
  for (const json& offsets : {json::array({0}), json({0, 8, 16}), json({-8, 8}), json({0.0, 16}),
                              json("0-16"), json(nullptr), json({0, nullptr})}) {
    EXPECT_THAT(OpenWithHeader(with("data_offsets", offsets)),
                StatusIs(kDataLoss,
                         "tensor \"w\": data_offsets must be a list of two "
                         "non-negative integers"))
        << offsets.dump();
  }
}

TEST(SafetensorsTest, RefusesOffsetsThatDoNotFit) {
  auto entry = [](const json& shape, uint64_t begin, uint64_t end) {
    return OneTensor({{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, end}}});
  };
  EXPECT_THAT(OpenWithHeader(entry({2}, 16, 8)),
              StatusIs(kDataLoss, "tensor \"w\": data_offsets [16, 8] are out of order"));
  EXPECT_THAT(OpenWithHeader(entry({2}, 60, 68)),
              StatusIs(kDataLoss,
                       "tensor \"w\": data_offsets [60, 68] end past the data section (64 bytes)"));
  EXPECT_THAT(OpenWithHeader(entry({2}, 0, 12)),
              StatusIs(kDataLoss,
                       "tensor \"w\": data_offsets [0, 12] hold 12 bytes, but shape "
                       "[2] of F32 needs 8"));
  EXPECT_THAT(OpenWithHeader(entry({4}, 0, 8)), StatusIs(kDataLoss, "needs 16"));
  EXPECT_THAT(OpenWithHeader(entry({0}, 0, 4)), StatusIs(kDataLoss, "needs 0"));
  EXPECT_THAT(OpenWithHeader(entry(json::array(), 0, 8)),
              StatusIs(kDataLoss, "shape [] of F32 needs 4"));
  EXPECT_THAT(OpenWithHeader(entry({2}, uint64_t{1} << 62, (uint64_t{1} << 62) + 8)),
              StatusIs(kDataLoss, "end past the data section"));
}

TEST(SafetensorsTest, RefusesElementCountsThatOverflow) {
  // 2^32 * 2^32 overflows 64 bits; 2^62 F32 elements overflow the byte count; a zero dimension
  // after overflowing ones still must not be accepted as 0 bytes.
  const std::vector<json> shapes = {
      json({uint64_t{1} << 32, uint64_t{1} << 32}),
      json({uint64_t{1} << 62}),
      json({uint64_t{1} << 32, uint64_t{1} << 32, 0}),
      json({int64_t{3037000500}, int64_t{3037000500}}),
  };
  for (const json& shape : shapes) {
    EXPECT_THAT(
        OpenWithHeader(OneTensor({{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {0, 0}}})),
        StatusIs(kDataLoss, "tensor \"w\": shape "))
        << shape.dump();
    EXPECT_THAT(
        OpenWithHeader(OneTensor({{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {0, 0}}})),
        StatusIs(kDataLoss, "has too many elements"))
        << shape.dump();
  }
}

TEST(SafetensorsTest, RefusesOverlappingTensors) {
  auto tensor = [](uint64_t begin, uint64_t end) {
    return json{{"dtype", "U8"}, {"shape", {end - begin}}, {"data_offsets", {begin, end}}};
  };
  EXPECT_THAT(OpenWithHeader(json{{"a", tensor(0, 16)}, {"b", tensor(8, 24)}}.dump()),
              StatusIs(kDataLoss, "tensors \"a\" [0, 16] and \"b\" [8, 24] overlap"));
  EXPECT_THAT(OpenWithHeader(json{{"a", tensor(0, 16)}, {"b", tensor(0, 16)}}.dump()),
              StatusIs(kDataLoss, "overlap in the data section"));
  // A range inside a larger one.
  EXPECT_THAT(OpenWithHeader(
                  json{{"big", tensor(0, 32)}, {"x", tensor(2, 3)}, {"y", tensor(20, 24)}}.dump()),
              StatusIs(kDataLoss, "tensors \"big\" [0, 32] and \"x\" [2, 3] overlap"));
  // An empty tensor between two overlapping ones hides nothing (train/modelio.py, comparing
  // neighbours only, misses this one).
  EXPECT_THAT(
      OpenWithHeader(json{{"big", tensor(0, 32)},
                          {"e", {{"dtype", "U8"}, {"shape", {0}}, {"data_offsets", {2, 2}}}},
                          {"y", tensor(20, 24)}}
                         .dump()),
      StatusIs(kDataLoss, "tensors \"big\" [0, 32] and \"y\" [20, 24] overlap"));
  EXPECT_THAT(
      OpenWithHeader(json{{"a", tensor(0, 8)}, {"b", tensor(8, 16)}, {"c", tensor(16, 64)}}.dump()),
      IsOk());
}

TEST(SafetensorsTest, OddTensorNamesAreQuotedInMessages) {
  const json entry = {{"dtype", "F9"}, {"shape", {1}}, {"data_offsets", {0, 1}}};
  EXPECT_THAT(OpenWithHeader(json{{"a\nb", entry}}.dump()),
              StatusIs(kDataLoss, "tensor \"a\\nb\": dtype"));
}

TEST(SafetensorsTest, DTypeProperties) {
  EXPECT_EQ(DTypeName(DType::kBF16), "BF16");
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kU8), 1u);
  EXPECT_TRUE(IsFloating(DType::kBF16));
  EXPECT_FALSE(IsFloating(DType::kI64));
}

TEST(SafetensorsTest, ReadsTheGoldenFixtures) {
  // golden.safetensors of a tiny fixture (tests/golden/README.md): shapes and dtypes as
  // documented, metadata present, the prompt is the fixture's 54 bytes (train/golden.py
  // TINY_PROMPT; its comment and the README say 55).
  const std::string path = test::SourcePath("tests/golden/softmax/golden.safetensors");
  PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile file, SafetensorsFile::Open(path));
  EXPECT_EQ(file.Find("tokens")->dtype, DType::kI32);
  EXPECT_EQ(file.Find("tokens")->shape, (std::vector<int64_t>{54}));
  EXPECT_EQ(file.Find("positions")->shape, (std::vector<int64_t>{9}));
  EXPECT_EQ(file.Find("prefill_logits")->dtype, DType::kF32);
  EXPECT_EQ(file.Find("prefill_logits")->shape, (std::vector<int64_t>{9, 256}));
  EXPECT_EQ(file.Find("greedy_tokens")->shape, (std::vector<int64_t>{40}));
  EXPECT_EQ(file.Find("decode_logits")->shape, (std::vector<int64_t>{40, 256}));
  EXPECT_EQ(file.Find("greedy_margins")->shape, (std::vector<int64_t>{40}));
  EXPECT_EQ(file.metadata().at("model_dir"), ".");
  EXPECT_EQ(file.metadata().at("prefill_chunk"), "13");
  PS_ASSERT_OK_AND_ASSIGN(std::vector<float> margins, file.ReadFloat32("greedy_margins"));
  for (float m : margins) EXPECT_GE(m, 1e-3f);  // the README's promise
  PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> positions, file.ReadInt32("positions"));
  EXPECT_THAT(positions, ElementsAre(0, 1, 7, 8, 9, 23, 24, 40, 53));
}

}  // namespace
}  // namespace ps::engine
