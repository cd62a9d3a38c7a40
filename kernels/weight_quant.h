// The rounding rules of the reduced-precision weight formats (kernels/backend.h WeightDtype), in
// one place so that the CPU kernels' packing, the scalar reference and the tests quantise a weight
// identically. Header-only, scalar, no SIMD.
//   bf16: round to nearest even of the fp32 bit pattern (NaN stays a quiet NaN, overflow rounds
//         to infinity as IEEE says); relative error <= 2^-8 per weight (8 significant bits).
//   int8: per output row j, scale[j] = max_i |w[j, i]| / 127 and q[j, i] = round(w[j, i] /
//         scale[j]) in [-127, 127] (ties away from zero, std::lround); a row of zeros has scale 0.
//         Absolute error <= scale[j] / 2 per weight. Requires finite weights (the caller checks).
#ifndef POLYSKETCH_KERNELS_WEIGHT_QUANT_H_
#define POLYSKETCH_KERNELS_WEIGHT_QUANT_H_

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace ps::kernels {

// The bfloat16 nearest to `f` (ties to even), as its bit pattern.
constexpr uint16_t FloatToBf16Bits(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

constexpr float Bf16BitsToFloat(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

// `f` rounded to bfloat16, as a float.
constexpr float RoundToBf16(float f) { return Bf16BitsToFloat(FloatToBf16Bits(f)); }

// scale[j] of a row of k finite weights: max |w| / 127 (0 for a row of zeros).
inline float Int8RowScale(const float* row, int64_t k) {
  float max_abs = 0.0f;
  for (int64_t i = 0; i < k; ++i) max_abs = std::max(max_abs, std::abs(row[i]));
  return max_abs / 127.0f;
}

// q = round(w / scale), clamped to [-127, 127]; 0 when scale is 0.
inline int8_t QuantizeInt8(float w, float scale) {
  if (scale == 0.0f) return 0;
  const long q = std::lround(w / scale);
  return static_cast<int8_t>(std::clamp(q, -127L, 127L));
}

}  // namespace ps::kernels

#endif  // POLYSKETCH_KERNELS_WEIGHT_QUANT_H_
