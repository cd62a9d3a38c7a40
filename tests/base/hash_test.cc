// Fingerprint64: stable across runs and builds (exported states and prefix keys depend on it), and
// sensitive to every byte, the length and the seed.
#include "base/hash.h"

#include <set>
#include <string>

#include <gtest/gtest.h>

namespace ps {
namespace {

TEST(HashTest, ValuesAreStable) {
  // Pinned values: if these change, every exported state and model fingerprint changes with
  // them (bump kStateFormatVersion).
  const std::string text = "polysketch state";
  EXPECT_EQ(Fingerprint64(text.data(), text.size()), 0x15e548981613e566ULL);
  EXPECT_EQ(Fingerprint64("", 0), 0x77b0afbe1742c601ULL);
  EXPECT_NE(Fingerprint64(text.data(), text.size(), 1), 0x15e548981613e566ULL);
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
}

}  // namespace
}  // namespace ps
