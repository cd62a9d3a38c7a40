// ParseStrictJson refuses what could make a file mean two things; JsonForError stays short, safe
// and valid UTF-8 whatever it is given.
#include "server/engine/model_io/json_util.h"

#include <cstdint>
#include <limits>
#include <string>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/engine/model_io/tokenizer.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::nlohmann::json;
using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::Optional;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;

TEST(ParseStrictJsonTest, ParsesDocuments) {
  PS_ASSERT_OK_AND_ASSIGN(json value, ParseStrictJson(R"({"a": [1, {"b": null}], "c": "d"}  )"));
  EXPECT_EQ(value["a"][0], 1);
  EXPECT_TRUE(value["a"][1]["b"].is_null());
  EXPECT_EQ(value["c"], "d");
  EXPECT_THAT(ParseStrictJson("[]"), IsOk());
  EXPECT_THAT(ParseStrictJson("3"), IsOk());
}

TEST(ParseStrictJsonTest, RefusesDuplicateKeysAtAnyDepth) {
  EXPECT_THAT(ParseStrictJson(R"({"a": 1, "a": 2})"), StatusIs(kInvalid, "duplicate key \"a\""));
  EXPECT_THAT(ParseStrictJson(R"({"x": {"k": 1, "y": 2, "k": 3}})"),
              StatusIs(kInvalid, "duplicate key \"k\""));
  EXPECT_THAT(ParseStrictJson(R"([{"k": 1}, {"k": 1, "k": 1}])"),
              StatusIs(kInvalid, "duplicate key \"k\""));
  // The same key in sibling or nested objects is fine.
  EXPECT_THAT(ParseStrictJson(R"({"k": {"k": 1}, "j": {"k": 2}, "l": [{"k": 3}, {"k": 4}]})"),
              IsOk());
}

TEST(ParseStrictJsonTest, RefusesWhatPythonOrTheRfcRefuses) {
  EXPECT_THAT(ParseStrictJson(""), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("{"), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("{} x"), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("{\"a\": NaN}"), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("{\"a\": Infinity}"), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("{\"a\": 1,}"), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("// comment\n{}"), StatusIs(kInvalid));
  EXPECT_THAT(ParseStrictJson("\xEF\xBB\xBF{}"), StatusIs(kInvalid, "byte order mark"));
  EXPECT_THAT(ParseStrictJson("{\"a\": \"\xC3\x28\"}"), StatusIs(kInvalid));      // bad UTF-8
  EXPECT_THAT(ParseStrictJson("{\"a\": \"\xED\xA0\x80\"}"), StatusIs(kInvalid));  // surrogate
  EXPECT_THAT(ParseStrictJson(R"({"a": "\ud800"})"), StatusIs(kInvalid));         // lone escape
  EXPECT_THAT(ParseStrictJson(std::string("{\"a\": 1}\0", 9)), StatusIs(kInvalid, "NUL byte"));
  EXPECT_THAT(ParseStrictJson(std::string("{\"a\": 1}\0{\"b\": 2}", 17)),
              StatusIs(kInvalid, "NUL byte at offset 8"));
  EXPECT_THAT(ParseStrictJson(std::string("{\"a\": \"x\0y\"}", 12)), StatusIs(kInvalid));
  PS_ASSERT_OK_AND_ASSIGN(json escaped, ParseStrictJson(R"({"a": "x\u0000y"})"));
  EXPECT_EQ(escaped["a"].get<std::string>(), std::string("x\0y", 3));
}

TEST(ParseStrictJsonTest, ErrorMessagesArePrintableAscii) {
  absl::Status status = ParseStrictJson("{\"a\": \xFF\xFE\x01}").status();
  ASSERT_THAT(status, StatusIs(kInvalid));
  for (char c : status.message()) {
    EXPECT_TRUE(c >= 0x20 && c < 0x7f)
        << "byte " << static_cast<int>(c) << " in " << status.message();
  }
}

TEST(ParseStrictJsonTest, DeepNestingNeitherCrashesNorRendersLong) {
  constexpr int kDepth = 100000;
  const std::string text = std::string(kDepth, '[') + std::string(kDepth, ']');
  PS_ASSERT_OK_AND_ASSIGN(json value, ParseStrictJson(text));
  const std::string rendered = JsonForError(value);
  EXPECT_LE(rendered.size(), 80u);
  EXPECT_EQ(rendered.substr(0, 3), "[[[");
}

TEST(JsonForErrorTest, RendersCompactly) {
  EXPECT_EQ(JsonForError(json(-3)), "-3");
  EXPECT_EQ(JsonForError(json(1.5)), "1.5");
  EXPECT_EQ(JsonForError(json(2.0)), "2.0");
  EXPECT_EQ(JsonForError(json("8")), "\"8\"");
  EXPECT_EQ(JsonForError(json(true)), "true");
  EXPECT_EQ(JsonForError(json(nullptr)), "null");
  EXPECT_EQ(JsonForError(json::parse(R"({"b": [1, 2], "a": {}})")), R"({"a":{},"b":[1,2]})");
}

TEST(JsonForErrorTest, TruncatesLongValuesAtACharacterBoundary) {
  const std::string long_string = std::string(100, 'x');
  const std::string rendered = JsonForError(json(long_string), 20);
  EXPECT_EQ(rendered, "\"" + std::string(16, 'x') + "...");

  std::string euros;
  for (int i = 0; i < 50; ++i) euros += "\xE2\x82\xAC";  // 3 bytes each
  for (size_t limit = 5; limit < 40; ++limit) {
    const std::string cut = JsonForError(json(euros), limit);
    EXPECT_LE(cut.size(), limit);
    EXPECT_TRUE(IsValidUtf8(cut)) << limit;
  }
}

TEST(JsonToInt64Test, AcceptsOnlyIntegersThatFit) {
  EXPECT_THAT(JsonToInt64(json(1)), Optional(1));
  EXPECT_THAT(JsonToInt64(json(-3)), Optional(-3));
  EXPECT_THAT(JsonToInt64(json::parse("9223372036854775807")),
              Optional(std::numeric_limits<int64_t>::max()));
  EXPECT_THAT(JsonToInt64(json::parse("-9223372036854775808")),
              Optional(std::numeric_limits<int64_t>::min()));
  EXPECT_EQ(JsonToInt64(json::parse("9223372036854775808")), std::nullopt);
  EXPECT_EQ(JsonToInt64(json::parse("1.0")), std::nullopt);
  EXPECT_EQ(JsonToInt64(json(true)), std::nullopt);
  EXPECT_EQ(JsonToInt64(json("1")), std::nullopt);
  EXPECT_EQ(JsonToInt64(json(nullptr)), std::nullopt);
}

}  // namespace
}  // namespace ps::engine
