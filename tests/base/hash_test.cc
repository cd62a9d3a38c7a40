// Fingerprint64 is xxHash's XXH3 64-bit hash: it gives xxHash's published test vectors (the
// sanity vectors of xxHash's own test suite, over the buffer its generator fills), so exported
// states and prefix keys can be recomputed by any xxHash binding; and it is sensitive to every
// byte, the length and the seed.
#include "base/hash.h"

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace ps {
namespace {

constexpr uint64_t kPrime32 = 2654435761ULL;
constexpr uint64_t kPrime64 = 11400714785074694797ULL;

// xxHash's sanity buffer: byte i is the top byte of kPrime32 * kPrime64^i (mod 2^64).
std::vector<uint8_t> SanityBuffer(size_t size) {
  std::vector<uint8_t> buffer(size);
  uint64_t generator = kPrime32;
  for (size_t i = 0; i < size; ++i) {
    buffer[i] = static_cast<uint8_t>(generator >> 56);
    generator *= kPrime64;
  }
  return buffer;
}

TEST(HashTest, GivesXxh3PublishedTestVectors) {
  // XXH3_64bits of the empty input.
  EXPECT_EQ(Fingerprint64("", 0), 0x2D06800538D394C2ULL);
  const std::vector<uint8_t> buffer = SanityBuffer(16);
  struct Vector {
    size_t length;
    uint64_t seed;
    uint64_t want;
  };
  for (const Vector& v :
       {Vector{0, 0, 0x2D06800538D394C2ULL}, Vector{0, kPrime64, 0xA8A6B918B2F0364AULL},
        Vector{1, 0, 0xC44BDFF4074EECDBULL}, Vector{1, kPrime64, 0x032BE332DD766EF8ULL}}) {
    EXPECT_EQ(Fingerprint64(buffer.data(), v.length, v.seed), v.want)
        << "length " << v.length << ", seed " << v.seed;
  }
}

TEST(HashTest, TheLibraryIsXxHashItself) {
  // XXH64 of the empty input, a vector of xxHash's README: the linked library is xxHash.
  EXPECT_EQ(XXH64("", 0, 0), 0xEF46DB3751D8E999ULL);
  const std::string text = "polysketch state";
  EXPECT_EQ(Fingerprint64(text.data(), text.size(), 7), XXH3_64bits_withSeed(text.data(), 16, 7));
  EXPECT_NE(Fingerprint64(text.data(), text.size(), 1), Fingerprint64(text.data(), text.size()));
}

TEST(HashTest, EveryByteAndTheLengthMatter) {
  std::string bytes(67, '\0');
  std::set<uint64_t> seen;
  seen.insert(Fingerprint64(bytes.data(), bytes.size()));
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::string flipped = bytes;
    flipped[i] = 1;
    seen.insert(Fingerprint64(flipped.data(), flipped.size()));
  }
  for (size_t n = 0; n < bytes.size(); ++n) seen.insert(Fingerprint64(bytes.data(), n));
  // 1 + 67 flips + 67 shorter lengths, all distinct.
  EXPECT_EQ(seen.size(), 1u + 67u + 67u);
}

TEST(HashTest, CombineChains) {
  EXPECT_NE(Fingerprint64Combine(1, 2), Fingerprint64Combine(2, 1));
  EXPECT_EQ(Fingerprint64Combine(5, 9), Fingerprint64Combine(5, 9));
  const uint64_t value = 9;
  EXPECT_EQ(Fingerprint64Combine(5, 9), XXH3_64bits_withSeed(&value, sizeof(value), 5));
}

}  // namespace
}  // namespace ps
