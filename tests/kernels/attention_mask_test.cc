// KeyMask: the visibility rule of every kind (train/model.py allowed()), its monotonicity (what a
// cache relies on to drop keys), and MaxKept as a true bound on what a decode-order cache holds.
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
  const KeyMask strided{.kind = Kind::kStrided, .window = 2, .stride = 4};
  EXPECT_TRUE(strided.Visible(10, 9));
  EXPECT_FALSE(strided.Visible(10, 7));
  EXPECT_TRUE(strided.Visible(10, 4));  // a stride position
  EXPECT_TRUE(strided.Visible(10, 0));
  const KeyMask fixed{.kind = Kind::kFixed, .chunk = 4, .summary = 1};
  EXPECT_TRUE(fixed.Visible(9, 8));   // same chunk
  EXPECT_TRUE(fixed.Visible(9, 7));   // last of an earlier chunk
  EXPECT_FALSE(fixed.Visible(9, 6));  // not a summary
  EXPECT_FALSE(fixed.Visible(6, 7));  // the future
}

TEST(KeyMaskTest, KeptAfterNothingIsZero) {
  for (const KeyMask& mask : Masks()) EXPECT_EQ(mask.KeptAfter(0), 0);
}

TEST(KeyMaskTest, VisibilityNeverComesBack) {
  for (const KeyMask& mask : Masks()) {
    for (int64_t j = 0; j < 40; ++j) {
      bool lost = false;
      for (int64_t i = j; i < 80; ++i) {
        if (lost) {
          EXPECT_FALSE(mask.Visible(i, j)) << "i=" << i << " j=" << j;
        }
        lost |= !mask.Visible(i, j);
      }
    }
  }
}

TEST(KeyMaskTest, KeptAfterAndMaxKeptMatchADecodeOrderCache) {
  for (const KeyMask& mask : Masks()) {
    for (int64_t max_positions : {1, 2, 9, 33, 100}) {
      // Decode order: append position t, then count (before dropping what t cannot see: the
      // cache briefly holds both), then drop.
      std::vector<int64_t> kept;
      int64_t most = 0;
      for (int64_t t = 0; t < max_positions; ++t) {
        kept.push_back(t);
        most = std::max<int64_t>(most, static_cast<int64_t>(kept.size()));
        std::erase_if(kept, [&](int64_t j) { return !mask.Visible(t, j); });
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
