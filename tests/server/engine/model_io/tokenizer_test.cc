// Byte tokenizer and UTF-8: round trips, the golden prompt, id validation, incremental
// detokenization at every split point, and replacement of invalid sequences checked three ways:
// against CPython's bytes.decode("utf-8", "replace") on chosen cases, and against a decoder
// written from Unicode's definition (Table 3-7, maximal subparts) on every string of up to 3
// bytes, on 4-byte strings around every range boundary, and on random strings.
#include "server/engine/model_io/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/engine/model_io/safetensors.h"
#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::ElementsAre;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
const std::string kFffd = "\xEF\xBF\xBD";

ByteTokenizer Tokenizer() { return *ByteTokenizer::Create(256); }

std::vector<int32_t> Ids(const std::string& bytes) {
  std::vector<int32_t> ids;
  for (char c : bytes) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

// ---- A reference decoder written from the Unicode standard, not from the WHATWG algorithm ----

// Table 3-7, well-formed UTF-8 byte sequences: per row, the allowed range of each byte.
struct Row {
  int length;
  uint8_t lo[4], hi[4];
};
constexpr Row kTable37[] = {
    {1, {0x00}, {0x7F}},
    {2, {0xC2, 0x80}, {0xDF, 0xBF}},
    {3, {0xE0, 0xA0, 0x80}, {0xE0, 0xBF, 0xBF}},
    {3, {0xE1, 0x80, 0x80}, {0xEC, 0xBF, 0xBF}},
    {3, {0xED, 0x80, 0x80}, {0xED, 0x9F, 0xBF}},
    {3, {0xEE, 0x80, 0x80}, {0xEF, 0xBF, 0xBF}},
    {4, {0xF0, 0x90, 0x80, 0x80}, {0xF0, 0xBF, 0xBF, 0xBF}},
    {4, {0xF1, 0x80, 0x80, 0x80}, {0xF3, 0xBF, 0xBF, 0xBF}},
    {4, {0xF4, 0x80, 0x80, 0x80}, {0xF4, 0x8F, 0xBF, 0xBF}},
};

// The row whose first k bytes s[0..k) match, or nullptr.
const Row* MatchingRow(const std::string& s, size_t start, size_t k) {
  for (const Row& row : kTable37) {
    if (static_cast<size_t>(row.length) < k) continue;
    bool match = true;
    for (size_t j = 0; j < k; ++j) {
      const auto b = static_cast<uint8_t>(s[start + j]);
      match = match && b >= row.lo[j] && b <= row.hi[j];
    }
    if (match) return &row;
  }
  return nullptr;
}

// Decodes `s` by the definition: at each position take the maximal subpart (the longest prefix
// of a well-formed sequence, at least one byte); a complete one is a character, anything else
// one U+FFFD. Sets *valid to whether no replacement happened.
std::string ReferenceDecode(const std::string& s, bool* valid) {
  std::string out;
  *valid = true;
  size_t i = 0;
  while (i < s.size()) {
    size_t k = 0;
    const Row* row = nullptr;
    for (size_t len = 1; len <= 4 && i + len <= s.size(); ++len) {
      const Row* r = MatchingRow(s, i, len);
      if (r == nullptr) break;
      k = len;
      row = r;
    }
    if (row != nullptr && static_cast<size_t>(row->length) == k) {
      out += s.substr(i, k);
    } else {
      out += kFffd;
      *valid = false;
    }
    i += k == 0 ? 1 : k;
  }
  return out;
}

// Feeds `s` byte by byte, checking that every piece is valid UTF-8 on its own; returns the text.
std::string Stream(const std::string& s) {
  IncrementalDetokenizer detokenizer;
  std::string out;
  for (char c : s) {
    std::string piece;
    EXPECT_THAT(detokenizer.Push(static_cast<unsigned char>(c), piece), IsOk());
    EXPECT_TRUE(IsValidUtf8(piece));
    out += piece;
  }
  return out + detokenizer.Flush();
}

// ---------------------------------------- tests -------------------------------------------------

TEST(ByteTokenizerTest, NeedsExactly256Ids) {
  EXPECT_THAT(ByteTokenizer::Create(256), IsOk());
  EXPECT_EQ(Tokenizer().vocab_size(), 256);
  for (int64_t bad : {0, 255, 257, 50257, -1}) {
    EXPECT_THAT(ByteTokenizer::Create(bad), StatusIs(kInvalid, "vocab_size: ")) << bad;
  }
}

TEST(ByteTokenizerTest, EncodesBytes) {
  EXPECT_THAT(Tokenizer().Encode(std::string("A\0\xFF\xE2\x82\xAC", 6)),
              ElementsAre(65, 0, 255, 0xE2, 0x82, 0xAC));
  EXPECT_TRUE(Tokenizer().Encode("").empty());
}

TEST(ByteTokenizerTest, EncodesTheGoldenPromptAsThePythonReferenceDid) {
  // train/golden.py TINY_PROMPT; the fixture's tokens were written by Python's str.encode().
  const std::string prompt = "In the beginning God created the heaven and the earth.";
  for (const char* fixture : {"softmax", "polysketch-learned-local", "mixed"}) {
    PS_ASSERT_OK_AND_ASSIGN(SafetensorsFile golden,
                            SafetensorsFile::Open(test::SourcePath(
                                std::string("tests/golden/") + fixture + "/golden.safetensors")));
    PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> tokens, golden.ReadInt32("tokens"));
    EXPECT_EQ(Tokenizer().Encode(prompt), tokens) << fixture;
    PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> greedy, golden.ReadInt32("greedy_tokens"));
    EXPECT_THAT(Tokenizer().ValidateIds(greedy), IsOk());
    PS_ASSERT_OK_AND_ASSIGN(std::string text, Tokenizer().Decode(greedy));
    EXPECT_TRUE(IsValidUtf8(text));
  }
}

TEST(ByteTokenizerTest, ValidatesIdsAgainstTheVocabulary) {
  const ByteTokenizer tokenizer = Tokenizer();
  EXPECT_THAT(tokenizer.ValidateIds({}), IsOk());
  EXPECT_THAT(tokenizer.ValidateIds({0, 1, 255}), IsOk());
  EXPECT_THAT(tokenizer.ValidateIds({0, 256, -1}),
              StatusIs(kInvalid, "token_ids[1] = 256 is outside the vocabulary [0, 256)"));
  EXPECT_THAT(tokenizer.ValidateIds({-1}), StatusIs(kInvalid, "token_ids[0] = -1"));
  EXPECT_THAT(tokenizer.DecodeBytes({65, 1000}), StatusIs(kInvalid, "token_ids[1] = 1000"));
  EXPECT_THAT(tokenizer.Decode({0xE2, 0x82, -5}), StatusIs(kInvalid, "token_ids[2] = -5"));
}

TEST(ByteTokenizerTest, DecodeBytesRoundTripsEveryByte) {
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  const ByteTokenizer tokenizer = Tokenizer();
  PS_ASSERT_OK_AND_ASSIGN(std::string bytes, tokenizer.DecodeBytes(tokenizer.Encode(all)));
  EXPECT_EQ(bytes, all);
}

TEST(ByteTokenizerTest, DecodeRoundTripsValidText) {
  const ByteTokenizer tokenizer = Tokenizer();
  for (const std::string& text :
       {std::string(""), std::string("plain ASCII"), std::string("\0nul\0", 5),
        std::string("h\xC3\xA9llo w\xC3\xB6rld \xE2\x82\xAC \xF0\x9D\x84\x9E \xF0\x9F\x98\x80"),
        std::string("\xEF\xBF\xBD is valid"), std::string("\xF4\x8F\xBF\xBF\xED\x9F\xBF")}) {
    ASSERT_TRUE(IsValidUtf8(text)) << text;
    PS_ASSERT_OK_AND_ASSIGN(std::string decoded, tokenizer.Decode(tokenizer.Encode(text)));
    EXPECT_EQ(decoded, text);
  }
}

TEST(Utf8Test, MatchesPythonReplace) {
  // (bytes, bytes.decode("utf-8", "replace").encode(), bytes.decode("utf-8") succeeds), printed
  // by CPython 3.11.
  const struct {
    std::string in, out;
    bool valid;
  } kCases[] = {
      {"", "", true},
      {"abc", "abc", true},
      {std::string("\x00\x7f", 2), std::string("\x00\x7f", 2), true},
      {"\x80", kFffd, false},
      {"\xbf", kFffd, false},
      {"\xc0\x80", kFffd + kFffd, false},  // overlong NUL
      {"\xc1\xbf", kFffd + kFffd, false},
      {"\xc2", kFffd, false},
      {"\xc2"
       "A",
       kFffd + "A", false},
      {"\xc2\xa9", "\xc2\xa9", true},
      {"\xe0\x80\x80", kFffd + kFffd + kFffd, false},  // overlong
      {"\xe0\x9f\xbf", kFffd + kFffd + kFffd, false},
      {"\xe0\xa0\x80", "\xe0\xa0\x80", true},
      {"\xe0\xa0", kFffd, false},
      {"\xed\x9f\xbf", "\xed\x9f\xbf", true},
      {"\xed\xa0\x80", kFffd + kFffd + kFffd, false},  // surrogate U+D800
      {"\xed\xbf\xbf", kFffd + kFffd + kFffd, false},  // surrogate U+DFFF
      {"\xee\x80\x80", "\xee\x80\x80", true},
      {"\xef\xbf\xbd", "\xef\xbf\xbd", true},
      {"\xf0\x80\x80\x80", kFffd + kFffd + kFffd + kFffd, false},
      {"\xf0\x8f\xbf\xbf", kFffd + kFffd + kFffd + kFffd, false},
      {"\xf0\x90\x80\x80", "\xf0\x90\x80\x80", true},
      {"\xf0\x90\x80", kFffd, false},  // truncated: one U+FFFD
      {"\xf0\x90", kFffd, false},
      {"\xf4\x8f\xbf\xbf", "\xf4\x8f\xbf\xbf", true},              // U+10FFFF
      {"\xf4\x90\x80\x80", kFffd + kFffd + kFffd + kFffd, false},  // U+110000
      {"\xf5\x80\x80\x80", kFffd + kFffd + kFffd + kFffd, false},
      {"\xf8\x88\x80\x80\x80", kFffd + kFffd + kFffd + kFffd + kFffd, false},
      {"\xfc\x84\x80\x80\x80\x80", kFffd + kFffd + kFffd + kFffd + kFffd + kFffd, false},
      {"\xfe", kFffd, false},
      {"\xff", kFffd, false},
      {"\xe2\x82\xac", "\xe2\x82\xac", true},
      {"\xe2\x82", kFffd, false},
      {"\xe2\x82"
       "A",
       kFffd + "A", false},
      {"\xe2"
       "A"
       "\xac",
       kFffd + "A" + kFffd, false},
      {"\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80", true},
      {"\xf0\x9f\x98", kFffd, false},
      {"\xf0\x9f\x98"
       "A",
       kFffd + "A", false},
      {"a\xf0\x9f\x98\xf0\x9f\x98\x80"
       "b",
       "a" + kFffd +
           "\xf0\x9f\x98\x80"
           "b",
       false},
      {"\xc2\xc2\xa9", kFffd + "\xc2\xa9", false},
      // Unicode 15, Table 3-11's example: four maximal subparts, then "A".
      {"\xe1\x80\xe2\xf0\x91\x92\xf1\xbf"
       "A",
       kFffd + kFffd + kFffd + kFffd + "A", false},
      {"\xf1\x80\x80\x80", "\xf1\x80\x80\x80", true},
      {"\xf3\xbf\xbf\xbf", "\xf3\xbf\xbf\xbf", true},
  };
  const ByteTokenizer tokenizer = Tokenizer();
  for (const auto& c : kCases) {
    PS_ASSERT_OK_AND_ASSIGN(std::string decoded, tokenizer.Decode(Ids(c.in)));
    EXPECT_EQ(decoded, c.out) << testing::PrintToString(c.in);
    EXPECT_EQ(Stream(c.in), c.out) << testing::PrintToString(c.in);
    EXPECT_EQ(IsValidUtf8(c.in), c.valid) << testing::PrintToString(c.in);
    bool valid;
    EXPECT_EQ(ReferenceDecode(c.in, &valid), c.out) << testing::PrintToString(c.in);
    EXPECT_EQ(valid, c.valid);
  }
}

TEST(IncrementalDetokenizerTest, NeverEmitsHalfACharacter) {
  // After every byte, the text so far is exactly the complete characters so far.
  const std::vector<std::string> characters = {
      "a",        "\xC3\xA9",    "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xF0\x9D\x84\x9E",
      " ",        "\xD0\x96",    "\xE4\xB8\xAD", "\xF4\x8F\xBF\xBF", "\x7F",
      "\xC2\x80", "\xEF\xBF\xBF"};
  std::string text;
  std::vector<size_t> boundaries = {0};
  for (int round = 0; round < 3; ++round) {
    for (const std::string& c : characters) {
      text += c;
      boundaries.push_back(text.size());
    }
  }
  IncrementalDetokenizer detokenizer;
  std::string out;
  size_t boundary = 0;
  for (size_t k = 1; k <= text.size(); ++k) {
    PS_ASSERT_OK_AND_ASSIGN(std::string piece,
                            detokenizer.Push(static_cast<unsigned char>(text[k - 1])));
    out += piece;
    if (std::find(boundaries.begin(), boundaries.end(), k) != boundaries.end()) boundary = k;
    ASSERT_EQ(out, text.substr(0, boundary)) << "after " << k << " bytes";
    ASSERT_EQ(static_cast<size_t>(detokenizer.pending_bytes()), k - boundary);
  }
  EXPECT_EQ(detokenizer.Flush(), "");
}

TEST(IncrementalDetokenizerTest, EverySplitOfEveryLength) {
  // For characters of 2, 3 and 4 bytes: stopping after each proper prefix and flushing gives one
  // U+FFFD; continuing gives the character, emitted by its last byte only.
  for (const std::string& c : std::vector<std::string>{"\xC3\xA9", "\xE2\x82\xAC", "\xED\x9F\xBF",
                                                       "\xF0\x9F\x98\x80", "\xF4\x8F\xBF\xBF"}) {
    for (size_t cut = 1; cut < c.size(); ++cut) {
      IncrementalDetokenizer detokenizer;
      std::string out;
      for (size_t i = 0; i < cut; ++i) {
        ASSERT_THAT(detokenizer.Push(static_cast<unsigned char>(c[i]), out), IsOk());
      }
      EXPECT_EQ(out, "");
      IncrementalDetokenizer copy = detokenizer;  // the state copies
      EXPECT_EQ(detokenizer.Flush(), kFffd);
      for (size_t i = cut; i < c.size(); ++i) {
        PS_ASSERT_OK_AND_ASSIGN(std::string piece, copy.Push(static_cast<unsigned char>(c[i])));
        EXPECT_EQ(piece, i + 1 == c.size() ? c : "");
      }
      EXPECT_EQ(copy.Flush(), "");
    }
  }
}

TEST(IncrementalDetokenizerTest, FlushEndsAndResetsTheStream) {
  IncrementalDetokenizer detokenizer;
  EXPECT_EQ(detokenizer.Flush(), "");
  for (int id : {0xF0, 0x9F, 0x98}) {
    PS_ASSERT_OK_AND_ASSIGN(std::string piece, detokenizer.Push(id));
    EXPECT_EQ(piece, "");
  }
  EXPECT_EQ(detokenizer.pending_bytes(), 3);
  EXPECT_EQ(detokenizer.Flush(), kFffd);
  EXPECT_EQ(detokenizer.pending_bytes(), 0);
  EXPECT_EQ(detokenizer.Flush(), "");
  // A fresh stream: a continuation byte now is a stray one.
  PS_ASSERT_OK_AND_ASSIGN(std::string piece, detokenizer.Push(0x80));
  EXPECT_EQ(piece, kFffd);
  PS_ASSERT_OK_AND_ASSIGN(piece, detokenizer.Push('A'));
  EXPECT_EQ(piece, "A");
}

TEST(IncrementalDetokenizerTest, AByteThatBreaksASequenceIsReadAfresh) {
  IncrementalDetokenizer detokenizer;
  std::string out;
  ASSERT_THAT(detokenizer.Push(0xE2, out), IsOk());
  ASSERT_THAT(detokenizer.Push(0x82, out), IsOk());
  ASSERT_THAT(detokenizer.Push(0xC3, out), IsOk());  // a lead byte: U+FFFD, then it starts anew
  EXPECT_EQ(out, kFffd);
  ASSERT_THAT(detokenizer.Push(0xA9, out), IsOk());
  EXPECT_EQ(out, kFffd + "\xC3\xA9");
}

TEST(IncrementalDetokenizerTest, BadIdLeavesTheStateAlone) {
  IncrementalDetokenizer detokenizer;
  std::string out;
  ASSERT_THAT(detokenizer.Push(0xF0, out), IsOk());
  ASSERT_THAT(detokenizer.Push(0x9F, out), IsOk());
  EXPECT_THAT(detokenizer.Push(256), StatusIs(kInvalid, "token id 256 is outside"));
  EXPECT_THAT(detokenizer.Push(-1, out), StatusIs(kInvalid, "token id -1"));
  EXPECT_EQ(out, "");
  EXPECT_EQ(detokenizer.pending_bytes(), 2);
  ASSERT_THAT(detokenizer.Push(0x98, out), IsOk());
  ASSERT_THAT(detokenizer.Push(0x80, out), IsOk());
  EXPECT_EQ(out, "\xF0\x9F\x98\x80");
}

TEST(Utf8Test, EveryStringOfUpToThreeBytesAgreesWithTheDefinition) {
  const ByteTokenizer tokenizer = Tokenizer();
  std::string s;
  std::vector<int32_t> ids;
  // Returns false (after reporting) on the first disagreement, so a bug gives one failure, not
  // millions.
  auto check = [&]() {
    bool valid;
    const std::string want = ReferenceDecode(s, &valid);
    ids.assign(s.begin(), s.end());
    for (int32_t& id : ids) id &= 0xFF;
    absl::StatusOr<std::string> got = tokenizer.Decode(ids);
    if (IsValidUtf8(s) != valid || !got.ok() || *got != want) {
      ADD_FAILURE() << testing::PrintToString(s) << ": IsValidUtf8 " << IsValidUtf8(s)
                    << ", definition " << valid << "; Decode "
                    << testing::PrintToString(got.value_or("<error>")) << ", definition "
                    << testing::PrintToString(want);
      return false;
    }
    return true;
  };
  for (int a = 0; a < 256; ++a) {
    s = std::string(1, static_cast<char>(a));
    if (!check()) return;
    for (int b = 0; b < 256; ++b) {
      s = {static_cast<char>(a), static_cast<char>(b)};
      if (!check()) return;
      if (a < 0x80 && b < 0x80) continue;  // ASCII + ASCII + any is covered by shorter strings
      for (int c = 0; c < 256; ++c) {
        s = {static_cast<char>(a), static_cast<char>(b), static_cast<char>(c)};
        if (!check()) return;
      }
    }
  }
}

TEST(Utf8Test, FourByteStringsAroundEveryBoundaryAgreeWithTheDefinition) {
  const std::vector<int> edges = {0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0,
                                  0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xED, 0xEF,
                                  0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xF7, 0xF8, 0xFF};
  const ByteTokenizer tokenizer = Tokenizer();
  for (int a : edges) {
    for (int b : edges) {
      for (int c : edges) {
        for (int d : edges) {
          const std::string s = {static_cast<char>(a), static_cast<char>(b), static_cast<char>(c),
                                 static_cast<char>(d)};
          bool valid;
          const std::string want = ReferenceDecode(s, &valid);
          ASSERT_EQ(IsValidUtf8(s), valid) << testing::PrintToString(s);
          PS_ASSERT_OK_AND_ASSIGN(std::string got, tokenizer.Decode(Ids(s)));
          ASSERT_EQ(got, want) << testing::PrintToString(s);
        }
      }
    }
  }
}

TEST(Utf8Test, RandomStringsAgreeWithTheDefinitionAndStreamAsAWhole) {
  std::mt19937 rng(12345);
  // Mostly bytes that make multi-byte sequences (leads and continuations), some ASCII.
  std::uniform_int_distribution<int> kind(0, 9), any(0, 255), cont(0x80, 0xBF), lead(0xC0, 0xFF);
  const ByteTokenizer tokenizer = Tokenizer();
  for (int trial = 0; trial < 20000; ++trial) {
    std::string s;
    const int length = trial % 24;
    for (int i = 0; i < length; ++i) {
      const int k = kind(rng);
      s += static_cast<char>(k < 4 ? cont(rng) : k < 7 ? lead(rng) : any(rng));
    }
    bool valid;
    const std::string want = ReferenceDecode(s, &valid);
    ASSERT_EQ(IsValidUtf8(s), valid) << testing::PrintToString(s);
    ASSERT_EQ(Stream(s), want) << testing::PrintToString(s);
    PS_ASSERT_OK_AND_ASSIGN(std::string got, tokenizer.Decode(Ids(s)));
    ASSERT_EQ(got, want);
    ASSERT_TRUE(IsValidUtf8(got));
  }
}

}  // namespace
}  // namespace ps::engine
