// Exact conversions of IEEE binary16 (F16) and bfloat16 (BF16) bit patterns to float. Weights may
// be stored in either (docs/model-format.md); every F16 and BF16 value is exactly representable
// as a float, so these conversions lose nothing: subnormals, signed zeros, infinities and NaN
// payloads all survive.
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

// bfloat16 is the top half of a binary32.
constexpr float BFloat16BitsToFloat(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace ps

#endif  // POLYSKETCH_BASE_HALF_H_
