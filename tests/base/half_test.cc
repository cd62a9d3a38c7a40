// F16 and BF16 -> float: every one of the 65536 bit patterns of each, against a reference built
// from the IEEE definitions with ldexp (an independent formula, not the bit manipulation).
#include "base/half.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include <gtest/gtest.h>

namespace ps {
namespace {

// binary16 by definition: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * (m/1024).
double HalfReference(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0x1f) return m == 0 ? sign * std::numeric_limits<double>::infinity() : std::nan("");
  if (e == 0) return sign * std::ldexp(static_cast<double>(m), -24);
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

TEST(HalfTest, EveryF16PatternConvertsExactly) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const auto h = static_cast<uint16_t>(bits);
    const float got = HalfBitsToFloat(h);
    const double want = HalfReference(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << bits;
      // The payload survives (shifted into the top of the float mantissa) and so does the sign.
      EXPECT_EQ(std::bit_cast<uint32_t>(got) & 0x7fffffu, static_cast<uint32_t>(bits & 0x3ff)
                                                              << 13);
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << bits;
    }
    ASSERT_EQ(std::signbit(got), (bits & 0x8000) != 0) << std::hex << bits;  // also -0.0
  }
}

TEST(HalfTest, NamedF16Values) {
  EXPECT_EQ(HalfBitsToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfBitsToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfBitsToFloat(0x7BFF), 65504.0f);                  // largest finite
  EXPECT_EQ(HalfBitsToFloat(0x0400), std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(HalfBitsToFloat(0x0001), std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(HalfBitsToFloat(0x03FF), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(HalfBitsToFloat(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(HalfBitsToFloat(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(HalfBitsToFloat(0x7E00)));
  EXPECT_EQ(std::bit_cast<uint32_t>(HalfBitsToFloat(0x8000)), 0x80000000u);
  static_assert(HalfBitsToFloat(0x3555) == 0x1.554p-2f);  // usable at compile time
}

TEST(HalfTest, EveryBF16PatternIsTheTopHalfOfAFloat) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const float got = BFloat16BitsToFloat(static_cast<uint16_t>(bits));
    ASSERT_EQ(std::bit_cast<uint32_t>(got), bits << 16) << std::hex << bits;
  }
  EXPECT_EQ(BFloat16BitsToFloat(0x3F80), 1.0f);
  EXPECT_EQ(BFloat16BitsToFloat(0xC040), -3.0f);
  EXPECT_EQ(BFloat16BitsToFloat(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
}

}  // namespace
}  // namespace ps
