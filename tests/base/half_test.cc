// F16 and BF16 -> float: every one of the 65536 bit patterns of each, against a reference built
// from the IEEE definitions with ldexp (an independent formula, not the bit manipulation).
// float -> F16 (FloatToHalfBits): a sweep over the float bit patterns against round-to-nearest-
// even done in double arithmetic (value / spacing, std::nearbyint), plus the named edge cases.
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

// The binary16 nearest to f (ties to even), by arithmetic in double: f / spacing is exact, and
// nearbyint rounds half to even in the default rounding mode. +-infinity past the largest finite
// value's rounding range; NaN for NaN.
double NearestHalfReference(float f) {
  if (std::isnan(f)) return std::nan("");
  const double a = std::fabs(static_cast<double>(f));
  if (std::isinf(f)) return static_cast<double>(f);
  const int exponent = a < std::ldexp(1.0, -14) ? -14 : std::ilogb(a);
  const double spacing = std::ldexp(1.0, exponent - 10);
  double rounded = std::nearbyint(a / spacing) * spacing;
  if (rounded > 65504.0) rounded = std::numeric_limits<double>::infinity();
  return std::signbit(f) ? -rounded : rounded;
}

TEST(HalfTest, FloatToHalfRoundsToNearestEvenOverTheFloatRange) {
  // Every 251st float bit pattern (17 million, all exponents and signs) and every pattern near the
  // binary16 range's edges.
  auto check = [](uint32_t bits) {
    const float f = std::bit_cast<float>(bits);
    const uint16_t got = FloatToHalfBits(f);
    const double want = NearestHalfReference(f);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(HalfBitsToFloat(got))) << std::hex << bits;
      return;
    }
    ASSERT_EQ(HalfReference(got), want) << std::hex << bits;
    ASSERT_EQ((got & 0x8000) != 0, std::signbit(f)) << std::hex << bits;  // also -0 and -tiny
  };
  for (uint64_t bits = 0; bits <= 0xFFFFFFFFull; bits += 251) check(static_cast<uint32_t>(bits));
  for (uint32_t center : {0x477FF000u, 0x38800000u, 0x33000000u, 0x33800000u}) {
    for (uint32_t d = 0; d < 4096; ++d) {
      check(center - 2048 + d);
      check((center - 2048 + d) | 0x80000000u);
    }
  }
}

TEST(HalfTest, FloatToHalfNamedValues) {
  EXPECT_EQ(FloatToHalfBits(1.0f), 0x3C00);
  EXPECT_EQ(FloatToHalfBits(-2.0f), 0xC000);
  EXPECT_EQ(FloatToHalfBits(65504.0f), 0x7BFF);
  EXPECT_EQ(FloatToHalfBits(65519.99f), 0x7BFF);  // below the half-way point: stays finite
  EXPECT_EQ(FloatToHalfBits(65520.0f), 0x7C00);   // the tie goes to the even neighbour: infinity
  EXPECT_EQ(FloatToHalfBits(1.0f + 0x1p-11f), 0x3C00);      // tie: down to even 1.0
  EXPECT_EQ(FloatToHalfBits(1.0f + 3 * 0x1p-11f), 0x3C02);  // tie: up to even
  EXPECT_EQ(FloatToHalfBits(0x1p-25f), 0x0000);             // tie with zero: to zero
  EXPECT_EQ(FloatToHalfBits(0x1.000002p-25f), 0x0001);      // just above: smallest subnormal
  EXPECT_EQ(FloatToHalfBits(0x1.ff8p-15f), 0x03FF);         // largest subnormal
  EXPECT_EQ(FloatToHalfBits(0x1.ffcp-15f), 0x0400);         // tie with 2^-14: up to even, a normal
  EXPECT_EQ(FloatToHalfBits(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalfBits(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToHalfBits(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(FloatToHalfBits(std::numeric_limits<float>::quiet_NaN()) & 0x7E00, 0x7E00);
  static_assert(FloatToHalfBits(0.5f) == 0x3800);  // usable at compile time
}

TEST(HalfTest, EveryFiniteF16SurvivesTheRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    if ((bits & 0x7C00) == 0x7C00 && (bits & 0x3FF) != 0) continue;  // NaN: checked above
    ASSERT_EQ(FloatToHalfBits(HalfBitsToFloat(static_cast<uint16_t>(bits))), bits)
        << std::hex << bits;
  }
}

}  // namespace
}  // namespace ps
