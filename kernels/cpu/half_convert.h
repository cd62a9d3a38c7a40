// fp32 <-> IEEE binary16 conversion of whole rows, for the fp16 KV caches (--kv_cache_dtype fp16):
// F16C (vcvtph2ps / vcvtps2ph, 8 lanes) or AVX-512F (16 lanes) when the CPU has them, detected at
// run time, so a build without -march=native still uses them; otherwise base/half.h's scalar
// conversions. Every path gives the same bits: widening is exact, narrowing rounds to nearest,
// ties to even (vcvtps2ph rounding mode 0 == FloatToHalfBits).
#ifndef POLYSKETCH_KERNELS_CPU_HALF_CONVERT_H_
#define POLYSKETCH_KERNELS_CPU_HALF_CONVERT_H_

#include <cstdint>

#include <absl/strings/string_view.h>

namespace ps::kernels::cpu {

// dst[i] = the float value of binary16 bits src[i], i < n. Exact. Thread-safe.
void HalfToFloat(const uint16_t* src, int64_t n, float* dst);
// dst[r * cols + c] = HalfToFloat(rows[r][c]) for r < num_rows, c < cols: gathers a tile of cache
// rows into a contiguous fp32 block [num_rows, cols] (one dispatch per tile, not per row).
void HalfRowsToFloat(const uint16_t* const* rows, int64_t num_rows, int64_t cols, float* dst);
// dst[i] = src[i] rounded to the nearest binary16 (ties to even), i < n. Thread-safe.
void FloatToHalf(const float* src, int64_t n, uint16_t* dst);

// The instruction set the conversions above use on this CPU: "avx512f", "f16c" or "scalar".
absl::string_view HalfConversionIsa();

// For tests: the portable scalar conversions, whatever the CPU has.
void HalfToFloatScalar(const uint16_t* src, int64_t n, float* dst);
void FloatToHalfScalar(const float* src, int64_t n, uint16_t* dst);

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_HALF_CONVERT_H_
