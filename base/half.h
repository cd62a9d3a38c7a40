// Exact conversions of IEEE binary16 (F16) and bfloat16 (BF16) bit patterns to float. Weights may
// be stored in either (docs/model-format.md); every F16 and BF16 value is exactly representable
// as a float, so these conversions lose nothing: subnormals, signed zeros, infinities and NaN
// payloads all survive. FloatToHalfBits rounds the other way (fp16 KV caches, --kv_cache_dtype);
// it is the portable fallback of kernels/cpu/half_convert.h's F16C path and agrees with it bit
// for bit.
#ifndef POLYSKETCH_BASE_HALF_H_
#define POLYSKETCH_BASE_HALF_H_

#include <bit>
#include <cstdint>
#include <limits>

namespace ps {

static_assert(std::numeric_limits<float>::is_iec559, "float must be IEEE binary32");

// binary16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits.
constexpr float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {  // infinity (mantissa 0) or NaN (payload kept in the top bits)
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal mantissa * 2^-24: shift until the implicit bit appears, a float normal
    int e = -14;  // exponent of a binary16 subnormal's leading place
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e + 127) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

// Rounds a float to the nearest binary16, ties to even: what F16C's vcvtps2ph does with rounding
// mode 0 (and MXCSR's default flush settings off). |f| >= 65520 (half-way past 65504, the largest
// finite binary16) gives infinity; |f| <= 2^-25 gives a signed zero; NaN stays a quiet NaN with
// the top 9 payload bits kept.
constexpr uint16_t FloatToHalfBits(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // infinity or NaN
    if (magnitude == 0x7f800000u) return sign | 0x7c00u;
    return sign | 0x7e00u | static_cast<uint16_t>((magnitude >> 13) & 0x3ffu);
  }
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  uint32_t mantissa;               // the integer to round: the result's bits before rounding
  uint32_t rest;                   // the bits shifted out
  uint32_t halfway;                // rest == halfway: a tie
  if (magnitude >= 0x38800000u) {  // a binary16 normal (>= 2^-14): rebias 127 -> 15, keep 10 bits
    const uint32_t rebiased = magnitude - ((127u - 15u) << 23);
    mantissa = rebiased >> 13;
    rest = rebiased & 0x1fffu;
    halfway = 0x1000u;
  } else {  // a binary16 subnormal or zero: |f| / 2^-24 rounded to an integer
    const uint32_t exponent = magnitude >> 23;
    if (exponent < 102) return sign;  // |f| < 2^-25 rounds to zero
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 .. 24
    mantissa = significand >> shift;
    rest = significand & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1u);
  }
  // A carry out of the mantissa bumps the exponent, which is the right result (also for the
  // largest subnormal rounding up to the smallest normal).
  if (rest > halfway || (rest == halfway && (mantissa & 1u) != 0)) ++mantissa;
  return sign | static_cast<uint16_t>(mantissa);
}

// bfloat16 is the top half of a binary32.
constexpr float BFloat16BitsToFloat(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace ps

#endif  // POLYSKETCH_BASE_HALF_H_
