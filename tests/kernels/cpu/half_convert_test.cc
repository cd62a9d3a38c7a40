// The dispatched fp32 <-> binary16 row conversions (F16C / AVX-512F when the CPU has them) against
// base/half.h's scalar conversions, bit for bit, over a sweep of float bit patterns and every
// binary16 pattern, in lengths that leave vector tails (37 elements: two 16-lane blocks plus 5).
#include "kernels/cpu/half_convert.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <vector>

#include <gtest/gtest.h>

#include "base/half.h"

namespace ps::kernels::cpu {
namespace {

constexpr int64_t kChunk = 37;

TEST(HalfConvertTest, NarrowingMatchesTheScalarRoundingBitForBit) {
  std::cout << "[ isa ] " << HalfConversionIsa() << "\n";
  std::vector<float> src;
  for (uint64_t bits = 0; bits <= 0xFFFFFFFFull; bits += 4099) {
    src.push_back(std::bit_cast<float>(static_cast<uint32_t>(bits)));
  }
  std::vector<uint16_t> got(src.size()), want(src.size());
  for (size_t i = 0; i < src.size(); i += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, static_cast<int64_t>(src.size() - i));
    FloatToHalf(src.data() + i, n, got.data() + i);
  }
  FloatToHalfScalar(src.data(), static_cast<int64_t>(src.size()), want.data());
  for (size_t i = 0; i < src.size(); ++i) {
    ASSERT_EQ(got[i], want[i]) << "float bits " << std::hex << std::bit_cast<uint32_t>(src[i]);
    ASSERT_EQ(want[i], FloatToHalfBits(src[i]));
  }
}

TEST(HalfConvertTest, WideningIsExactForEveryPattern) {
  std::vector<uint16_t> src(65536);
  for (uint32_t i = 0; i < 65536; ++i) src[i] = static_cast<uint16_t>(i);
  std::vector<float> got(src.size()), rows_got(src.size());
  for (size_t i = 0; i < src.size(); i += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, static_cast<int64_t>(src.size() - i));
    HalfToFloat(src.data() + i, n, got.data() + i);
  }
  // The same as rows of 64 gathered in reverse order.
  std::vector<const uint16_t*> rows;
  for (int64_t r = 1023; r >= 0; --r) rows.push_back(src.data() + r * 64);
  HalfRowsToFloat(rows.data(), 1024, 64, rows_got.data());
  for (uint32_t i = 0; i < 65536; ++i) {
    const float want = HalfBitsToFloat(static_cast<uint16_t>(i));
    const float row_value = rows_got[(1023 - i / 64) * 64 + i % 64];
    if (std::isnan(want)) {  // the hardware quiets signalling NaNs; NaN-ness is what matters
      ASSERT_TRUE(std::isnan(got[i]) && std::isnan(row_value)) << std::hex << i;
      continue;
    }
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want)) << std::hex << i;
    ASSERT_EQ(std::bit_cast<uint32_t>(row_value), std::bit_cast<uint32_t>(want)) << std::hex << i;
  }
}

}  // namespace
}  // namespace ps::kernels::cpu
