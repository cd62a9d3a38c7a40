// KeyMask: the visibility rule of every kind (train/model.py allowed()), the keep rule of a cache
// (every key this or a later query sees; monotone, which is what lets a cache drop keys), the
// strided visible runs the decode kernels walk, and MaxKept as a true bound on a decode cache.
#include "kernels/attention_mask.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

namespace ps::kernels {
namespace {

using Kind = KeyMask::Kind;

std::vector<KeyMask> Masks() {
  return {
      {.kind = Kind::kCausal},
      {.kind = Kind::kWindow, .window = 1},
      {.kind = Kind::kWindow, .window = 7},
      {.kind = Kind::kStrided, .window = 5, .stride = 4},
      {.kind = Kind::kStrided, .window = 1, .stride = 3},
      {.kind = Kind::kStrided, .window = 9, .stride = 2},
      {.kind = Kind::kStrided, .window = 3, .stride = 1},
      {.kind = Kind::kFixed, .chunk = 8, .summary = 2},
      {.kind = Kind::kFixed, .chunk = 4, .summary = 4},
  };
}

TEST(KeyMaskTest, VisibilityOfEachKind) {
  const KeyMask causal{.kind = Kind::kCausal};
  EXPECT_TRUE(causal.Visible(5, 0));
  EXPECT_TRUE(causal.Visible(5, 5));
  EXPECT_FALSE(causal.Visible(5, 6));
  const KeyMask window{.kind = Kind::kWindow, .window = 3};
  EXPECT_TRUE(window.Visible(10, 8));
  EXPECT_FALSE(window.Visible(10, 7));
  // Child et al. 2019: the last 2 keys and every key a multiple of 4 back, not the keys j % 4 == 0.
  const KeyMask strided{.kind = Kind::kStrided, .window = 2, .stride = 4};
  EXPECT_TRUE(strided.Visible(10, 10));
  EXPECT_TRUE(strided.Visible(10, 9));
  EXPECT_FALSE(strided.Visible(10, 8));
  EXPECT_FALSE(strided.Visible(10, 7));
  EXPECT_TRUE(strided.Visible(10, 6));  // 4 back
  EXPECT_FALSE(strided.Visible(10, 4));
  EXPECT_TRUE(strided.Visible(10, 2));  // 8 back
  EXPECT_FALSE(strided.Visible(10, 0));
  EXPECT_TRUE(strided.Visible(11, 3));
  const KeyMask fixed{.kind = Kind::kFixed, .chunk = 4, .summary = 1};
  EXPECT_TRUE(fixed.Visible(9, 8));   // same chunk
  EXPECT_TRUE(fixed.Visible(9, 7));   // last of an earlier chunk
  EXPECT_FALSE(fixed.Visible(9, 6));  // not a summary
  EXPECT_FALSE(fixed.Visible(6, 7));  // the future
}

TEST(KeyMaskTest, KeptAfterNothingIsZero) {
  for (const KeyMask& mask : Masks()) EXPECT_EQ(mask.KeptAfter(0), 0);
}

TEST(KeyMaskTest, StridedVisibilityComesBack) {
  const KeyMask strided{.kind = Kind::kStrided, .window = 2, .stride = 4};
  EXPECT_TRUE(strided.Visible(6, 2));
  EXPECT_FALSE(strided.Visible(7, 2));
  EXPECT_TRUE(strided.Visible(10, 2));
  // So the cache keeps key 2 although query 7 does not see it.
  EXPECT_TRUE(strided.Kept(7, 2));
  EXPECT_EQ(strided.KeptAfter(8), 8);
}

// Kept(i, j) is exactly "query i or a later one sees j" (brute force over a horizon longer than
// any window + stride here), and once false it stays false.
TEST(KeyMaskTest, KeptIsWhatThisOrALaterQuerySees) {
  for (const KeyMask& mask : Masks()) {
    for (int64_t j = 0; j < 40; ++j) {
      bool lost = false;
      for (int64_t i = j; i < 80; ++i) {
        bool reachable = false;
        for (int64_t later = i; later < i + 40; ++later) reachable |= mask.Visible(later, j);
        EXPECT_EQ(mask.Kept(i, j), reachable)
            << "kind " << static_cast<int>(mask.kind) << " i=" << i << " j=" << j;
        if (lost) {
          EXPECT_FALSE(mask.Kept(i, j)) << "i=" << i << " j=" << j;
        }
        lost |= !mask.Kept(i, j);
      }
      EXPECT_FALSE(mask.Kept(j, j + 1));
    }
  }
}

TEST(KeyMaskTest, StridedVisibleRunsListTheVisibleKeys) {
  for (const KeyMask& mask : Masks()) {
    if (mask.kind != Kind::kStrided) continue;
    for (int64_t i = 0; i < 100; ++i) {
      std::vector<int64_t> want;
      for (int64_t j = 0; j <= i; ++j) {
        if (mask.Visible(i, j)) want.push_back(j);
      }
      std::vector<int64_t> got;
      for (int64_t v = 0; v < mask.NumVisible(i); ++v) got.push_back(mask.VisibleKey(i, v));
      EXPECT_EQ(got, want) << "window " << mask.window << " stride " << mask.stride << " i=" << i;
      EXPECT_LE(mask.NumVisible(i), mask.window + i / mask.stride);
    }
  }
}

TEST(KeyMaskTest, KeptAfterAndMaxKeptMatchADecodeOrderCache) {
  for (const KeyMask& mask : Masks()) {
    for (int64_t max_positions : {1, 2, 9, 33, 100}) {
      // Decode order: append position t, then count (before dropping what no query from t on
      // sees: the cache briefly holds both), then drop.
      std::vector<int64_t> kept;
      int64_t most = 0;
      for (int64_t t = 0; t < max_positions; ++t) {
        kept.push_back(t);
        most = std::max<int64_t>(most, static_cast<int64_t>(kept.size()));
        std::erase_if(kept, [&](int64_t j) { return !mask.Kept(t, j); });
      }
      EXPECT_EQ(static_cast<int64_t>(kept.size()), mask.KeptAfter(max_positions))
          << "kind " << static_cast<int>(mask.kind) << " after " << max_positions;
      EXPECT_LE(most, mask.MaxKept(max_positions))
          << "kind " << static_cast<int>(mask.kind) << " max_positions " << max_positions;
      EXPECT_LE(mask.MaxKept(max_positions), max_positions);
    }
  }
}

}  // namespace
}  // namespace ps::kernels
