// Row conversions between fp32 and binary16. The vector paths are compiled with target attributes
// (not the file's flags), so that one binary carries them and picks one at first use by
// __builtin_cpu_supports; tails shorter than a vector take the scalar path, which agrees bit for
// bit (both round to nearest even; vcvtps2ph with imm 0 ignores MXCSR, and the scalar code never
// flushes subnormals).
#include "kernels/cpu/half_convert.h"

#include <cstdint>

#include "base/half.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define PS_HALF_X86 1
#else
#define PS_HALF_X86 0
#endif

namespace ps::kernels::cpu {
namespace {

enum class Isa { kScalar, kF16c, kAvx512 };

#if PS_HALF_X86
// F16C from cpuid leaf 1 (ECX bit 29): clang's __builtin_cpu_supports has no "f16c" feature name.
// F16C's instructions are VEX-encoded, so the caller checks AVX (OS ymm support) as well.
bool HasF16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}
#endif

Isa DetectIsa() {
#if PS_HALF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx") && HasF16c()) return Isa::kF16c;
#endif
  return Isa::kScalar;
}

Isa CpuIsa() {
  static const Isa isa = DetectIsa();
  return isa;
}

#if PS_HALF_X86
// The AVX-512 conversions use their zero-masked forms with every lane set: the unmasked
// intrinsics pass an "undefined" source that GCC 12 reports as maybe-uninitialized.
constexpr __mmask16 kAll16 = 0xFFFF;

__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const uint16_t* src, int64_t n,
                                                         float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  HalfToFloatScalar(src + i, n - i, dst + i);
}

__attribute__((target("avx,f16c"))) void FloatToHalfF16c(const float* src, int64_t n,
                                                         uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  FloatToHalfScalar(src + i, n - i, dst + i);
}

__attribute__((target("avx512f"))) void HalfToFloatAvx512(const uint16_t* src, int64_t n,
                                                          float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(kAll16, h));
  }
  HalfToFloatScalar(src + i, n - i, dst + i);
}

__attribute__((target("avx512f"))) void FloatToHalfAvx512(const float* src, int64_t n,
                                                          uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h =
        _mm512_maskz_cvtps_ph(kAll16, _mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
  FloatToHalfScalar(src + i, n - i, dst + i);
}

__attribute__((target("avx512f"))) void HalfRowsToFloatAvx512(const uint16_t* const* rows,
                                                              int64_t num_rows, int64_t cols,
                                                              float* dst) {
  for (int64_t r = 0; r < num_rows; ++r) HalfToFloatAvx512(rows[r], cols, dst + r * cols);
}

__attribute__((target("avx,f16c"))) void HalfRowsToFloatF16c(const uint16_t* const* rows,
                                                             int64_t num_rows, int64_t cols,
                                                             float* dst) {
  for (int64_t r = 0; r < num_rows; ++r) HalfToFloatF16c(rows[r], cols, dst + r * cols);
}
#endif

}  // namespace

void HalfToFloatScalar(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = HalfBitsToFloat(src[i]);
}

void FloatToHalfScalar(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToHalfBits(src[i]);
}

void HalfToFloat(const uint16_t* src, int64_t n, float* dst) {
  switch (CpuIsa()) {
#if PS_HALF_X86
    case Isa::kAvx512:
      return HalfToFloatAvx512(src, n, dst);
    case Isa::kF16c:
      return HalfToFloatF16c(src, n, dst);
#endif
    default:
      return HalfToFloatScalar(src, n, dst);
  }
}

void HalfRowsToFloat(const uint16_t* const* rows, int64_t num_rows, int64_t cols, float* dst) {
  switch (CpuIsa()) {
#if PS_HALF_X86
    case Isa::kAvx512:
      return HalfRowsToFloatAvx512(rows, num_rows, cols, dst);
    case Isa::kF16c:
      return HalfRowsToFloatF16c(rows, num_rows, cols, dst);
#endif
    default:
      for (int64_t r = 0; r < num_rows; ++r) HalfToFloatScalar(rows[r], cols, dst + r * cols);
  }
}

void FloatToHalf(const float* src, int64_t n, uint16_t* dst) {
  switch (CpuIsa()) {
#if PS_HALF_X86
    case Isa::kAvx512:
      return FloatToHalfAvx512(src, n, dst);
    case Isa::kF16c:
      return FloatToHalfF16c(src, n, dst);
#endif
    default:
      return FloatToHalfScalar(src, n, dst);
  }
}

absl::string_view HalfConversionIsa() {
  switch (CpuIsa()) {
    case Isa::kAvx512:
      return "avx512f";
    case Isa::kF16c:
      return "f16c";
    case Isa::kScalar:
      break;
  }
  return "scalar";
}

}  // namespace ps::kernels::cpu
