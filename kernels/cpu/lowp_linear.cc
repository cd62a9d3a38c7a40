// bf16 / int8 weight GEMM (lowp_linear.h). A tile computes MR rows x 16 output features of one
// panel over the whole of k, keeping the accumulators in registers; each weight vector loaded and
// widened is used for all MR rows. Work units are (row block, panel), panel-inner, split over the
// pool as in dense.cc: at decode (one row block) the threads split the panels and W is streamed
// once in all.
//   * Bytes per call: W (2 n k for bf16, n k + 4 n for int8) once per row block, x (4 m k) once
//     per panel, y (4 m n) once.
//   * Widening: bf16 pairs (k = 2t, 2t+1) of 16 features sit in 16 32-bit lanes, so `lane << 16`
//     is W[:, 2t] in fp32 and `lane & 0xffff0000` is W[:, 2t+1]; int8 is vpmovsxbd + vcvtdq2ps.
//     The int8 row scale multiplies the finished dot product (one multiply per output).
//   * vdpbf16ps multiplies bf16 by bf16, so x is split into hi = bf16(x) and lo = bf16(x - hi)
//     and both are multiplied by the same weight pair: x is represented to 2^-16 relative, well
//     under the weights' own 2^-8, at the cost of a second vdpbf16ps.
//   * Small MR tiles split k over KU independent accumulators (FMA latency), summed at the end.
#include "kernels/cpu/lowp_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

#include "kernels/weight_quant.h"

#if defined(__x86_64__) || defined(__i386__)
#define PS_LOWP_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define PS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw")))
#define PS_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers initialise _mm512_undefined_* from themselves, which
// -Wmaybe-uninitialized reports at every inlined intrinsic (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace ps::kernels::cpu {
namespace {

constexpr int kNR = static_cast<int>(CpuLowpLinearWeight::kPanelWidth);
constexpr int kMaxMR = 8;                            // the largest tile of any path
constexpr int64_t kMB = 64;                          // rows per row block at prefill
constexpr int64_t kMinChunkMacs = int64_t{1} << 14;  // as dense.cc: below it a wake-up costs more

int64_t GrainFor(int64_t unit_cost, int64_t min_cost) {
  return std::max<int64_t>(1, (min_cost + unit_cost - 1) / std::max<int64_t>(1, unit_cost));
}

// Enough independent accumulators (>= 4 vectors) to cover FMA latency at small MR.
constexpr int KuFor(int mr) { return mr == 1 ? 4 : (mr <= 3 ? 2 : 1); }

// One tile's operands: rows i < MR of x (stride ldx) against one panel.
struct TileArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  int64_t k = 0;
  const void* panel = nullptr;
  const float* scale = nullptr;  // int8: the panel's 16 row scales; bf16: null
  const uint32_t* xs = nullptr;  // kAvx512Bf16: split rows [MR, ceil(k/2), 2] (hi pair, lo pair)
  int64_t ldxs = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  int ncols = kNR;  // features of this panel that exist (the last one may be partial)
  bool load_c = false;
};
using TileFn = void (*)(const TileArgs&);

// y[i, j] (+)= acc[i][j] (times the int8 scale) for the panel's existing features.
void Finish(const float (*acc)[kNR], int mr, const TileArgs& a) {
  for (int i = 0; i < mr; ++i) {
    float* yi = a.y + i * a.ldy;
    for (int j = 0; j < a.ncols; ++j) {
      const float v = a.scale != nullptr ? acc[i][j] * a.scale[j] : acc[i][j];
      yi[j] = a.load_c ? yi[j] + v : v;
    }
  }
}

// ---- kScalar ----------------------------------------------------------------------------------

template <int MR, int KU>
void TileBf16Scalar(const TileArgs& a) {
  float acc[MR][kNR] = {};
  const auto* w = static_cast<const uint16_t*>(a.panel);
  for (int64_t kk = 0; kk < a.k; ++kk) {
    const uint16_t* wk = w + (kk / 2) * kNR * 2 + (kk & 1);
    for (int i = 0; i < MR; ++i) {
      const float xi = a.x[i * a.ldx + kk];
      for (int j = 0; j < kNR; ++j) acc[i][j] += xi * Bf16BitsToFloat(wk[2 * j]);
    }
  }
  Finish(acc, MR, a);
}

template <int MR, int KU>
void TileInt8Scalar(const TileArgs& a) {
  float acc[MR][kNR] = {};
  const auto* w = static_cast<const int8_t*>(a.panel);
  for (int64_t kk = 0; kk < a.k; ++kk) {
    const int8_t* wk = w + kk * kNR;
    for (int i = 0; i < MR; ++i) {
      const float xi = a.x[i * a.ldx + kk];
      for (int j = 0; j < kNR; ++j) acc[i][j] += xi * static_cast<float>(wk[j]);
    }
  }
  Finish(acc, MR, a);
}

#if defined(PS_LOWP_X86)

// ---- kAvx2: 16 features = two 8-float vectors -------------------------------------------------

template <int MR, int KU>
PS_TARGET_AVX2 void TileBf16Avx2(const TileArgs& a) {
  __m256 acc[KU][MR][2];
  for (int u = 0; u < KU; ++u) {
    for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = _mm256_setzero_ps();
  }
  const auto* w = static_cast<const uint16_t*>(a.panel);
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t pairs = a.k / 2;
  // One pair t into accumulator set u; `odd`: k is odd and t is the last, half-empty pair.
  const auto step = [&](int64_t t, int u, bool odd) PS_TARGET_AVX2 {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 2 * kNR));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 2 * kNR + kNR));
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
    const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
    const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float* xi = a.x + i * a.ldx + 2 * t;
      const __m256 b0 = _mm256_set1_ps(xi[0]);
      acc[u][i][0] = _mm256_fmadd_ps(b0, e0, acc[u][i][0]);
      acc[u][i][1] = _mm256_fmadd_ps(b0, e1, acc[u][i][1]);
      if (!odd) {
        const __m256 b1 = _mm256_set1_ps(xi[1]);
        acc[u][i][0] = _mm256_fmadd_ps(b1, o0, acc[u][i][0]);
        acc[u][i][1] = _mm256_fmadd_ps(b1, o1, acc[u][i][1]);
      }
    }
  };
  int64_t t = 0;
  for (; t + KU <= pairs; t += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) step(t + u, u, false);
  }
  for (; t < pairs; ++t) step(t, 0, false);
  if (a.k & 1) step(pairs, 0, true);
  float out[MR][kNR];
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < KU; ++u) {
      acc[0][i][0] = _mm256_add_ps(acc[0][i][0], acc[u][i][0]);
      acc[0][i][1] = _mm256_add_ps(acc[0][i][1], acc[u][i][1]);
    }
    _mm256_storeu_ps(out[i], acc[0][i][0]);
    _mm256_storeu_ps(out[i] + 8, acc[0][i][1]);
  }
  Finish(out, MR, a);
}

template <int MR, int KU>
PS_TARGET_AVX2 void TileInt8Avx2(const TileArgs& a) {
  __m256 acc[KU][MR][2];
  for (int u = 0; u < KU; ++u) {
    for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = _mm256_setzero_ps();
  }
  const auto* w = static_cast<const int8_t*>(a.panel);
  const auto step = [&](int64_t kk, int u) PS_TARGET_AVX2 {
    const int8_t* wk = w + kk * kNR;
    const __m256 q0 = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wk))));
    const __m256 q1 = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wk + 8))));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_set1_ps(a.x[i * a.ldx + kk]);
      acc[u][i][0] = _mm256_fmadd_ps(b, q0, acc[u][i][0]);
      acc[u][i][1] = _mm256_fmadd_ps(b, q1, acc[u][i][1]);
    }
  };
  int64_t kk = 0;
  for (; kk + KU <= a.k; kk += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) step(kk + u, u);
  }
  for (; kk < a.k; ++kk) step(kk, 0);
  float out[MR][kNR];
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < KU; ++u) {
      acc[0][i][0] = _mm256_add_ps(acc[0][i][0], acc[u][i][0]);
      acc[0][i][1] = _mm256_add_ps(acc[0][i][1], acc[u][i][1]);
    }
    _mm256_storeu_ps(out[i], acc[0][i][0]);
    _mm256_storeu_ps(out[i] + 8, acc[0][i][1]);
  }
  Finish(out, MR, a);
}

// ---- kAvx512: 16 features = one vector ---------------------------------------------------------

template <int MR, int KU>
PS_TARGET_AVX512 void TileBf16Avx512(const TileArgs& a) {
  __m512 acc[KU][MR];
  for (int u = 0; u < KU; ++u) {
    for (int i = 0; i < MR; ++i) acc[u][i] = _mm512_setzero_ps();
  }
  const auto* w = static_cast<const uint16_t*>(a.panel);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t pairs = a.k / 2;
  const auto step = [&](int64_t t, int u, bool odd) PS_TARGET_AVX512 {
    const __m512i v = _mm512_loadu_si512(w + t * 2 * kNR);
    const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 o = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float* xi = a.x + i * a.ldx + 2 * t;
      acc[u][i] = _mm512_fmadd_ps(_mm512_set1_ps(xi[0]), e, acc[u][i]);
      if (!odd) acc[u][i] = _mm512_fmadd_ps(_mm512_set1_ps(xi[1]), o, acc[u][i]);
    }
  };
  int64_t t = 0;
  for (; t + KU <= pairs; t += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) step(t + u, u, false);
  }
  for (; t < pairs; ++t) step(t, 0, false);
  if (a.k & 1) step(pairs, 0, true);
  float out[MR][kNR];
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < KU; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    _mm512_storeu_ps(out[i], acc[0][i]);
  }
  Finish(out, MR, a);
}

template <int MR, int KU>
PS_TARGET_AVX512 void TileInt8Avx512(const TileArgs& a) {
  __m512 acc[KU][MR];
  for (int u = 0; u < KU; ++u) {
    for (int i = 0; i < MR; ++i) acc[u][i] = _mm512_setzero_ps();
  }
  const auto* w = static_cast<const int8_t*>(a.panel);
  const auto step = [&](int64_t kk, int u) PS_TARGET_AVX512 {
    const __m512 q = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kk * kNR))));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[u][i] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[i * a.ldx + kk]), q, acc[u][i]);
    }
  };
  int64_t kk = 0;
  for (; kk + KU <= a.k; kk += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) step(kk + u, u);
  }
  for (; kk < a.k; ++kk) step(kk, 0);
  float out[MR][kNR];
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < KU; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    _mm512_storeu_ps(out[i], acc[0][i]);
  }
  Finish(out, MR, a);
}

// ---- kAvx512Bf16: vdpbf16ps on (split x) . (weight pair) ------------------------------------

template <int MR, int KU>
PS_TARGET_AVX512BF16 void TileBf16Dp(const TileArgs& a) {
  __m512 acc[KU][MR];
  for (int u = 0; u < KU; ++u) {
    for (int i = 0; i < MR; ++i) acc[u][i] = _mm512_setzero_ps();
  }
  const auto* w = static_cast<const uint16_t*>(a.panel);
  const int64_t pairs = (a.k + 1) / 2;  // the split rows and the panel are zero-padded alike
  const auto step = [&](int64_t t, int u) PS_TARGET_AVX512BF16 {
    const __m512bh v = (__m512bh)_mm512_loadu_si512(w + t * 2 * kNR);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const uint32_t* xs = a.xs + i * a.ldxs + 2 * t;
      const auto hi = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs[0]));
      const auto lo = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs[1]));
      acc[u][i] = _mm512_dpbf16_ps(acc[u][i], hi, v);
      acc[u][i] = _mm512_dpbf16_ps(acc[u][i], lo, v);
    }
  };
  int64_t t = 0;
  for (; t + KU <= pairs; t += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) step(t + u, u);
  }
  for (; t < pairs; ++t) step(t, 0);
  float out[MR][kNR];
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < KU; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    _mm512_storeu_ps(out[i], acc[0][i]);
  }
  Finish(out, MR, a);
}

bool CpuHasAvx512Bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return ((eax >> 5) & 1u) != 0;  // CPUID.(EAX=7, ECX=1):EAX[5] AVX512_BF16
}

#endif  // PS_LOWP_X86

// x row [k] -> [ceil(k/2), 2] uint32: (hi pair, lo pair), hi = bf16(x), lo = bf16(x - hi), the
// element 2t in the low half of each 32-bit word (vdpbf16ps's pair order); odd k pads with 0.
void SplitRow(const float* x, int64_t k, uint32_t* out) {
  for (int64_t t = 0; t < (k + 1) / 2; ++t) {
    uint32_t hi = 0, lo = 0;
    for (int e = 0; e < 2 && 2 * t + e < k; ++e) {
      const float v = x[2 * t + e];
      const uint16_t h = FloatToBf16Bits(v);
      const uint16_t l = FloatToBf16Bits(v - Bf16BitsToFloat(h));
      hi |= static_cast<uint32_t>(h) << (16 * e);
      lo |= static_cast<uint32_t>(l) << (16 * e);
    }
    out[2 * t] = hi;
    out[2 * t + 1] = lo;
  }
}

// The tile table of one path: entry mr - 1 is the tile of mr rows.
struct Path {
  const TileFn* tiles = nullptr;
  int mr = 1;
  bool split_x = false;
};

#define PS_TILES4(F) \
  { &F<1, KuFor(1)>, &F<2, KuFor(2)>, &F<3, KuFor(3)>, &F<4, KuFor(4)> }
#define PS_TILES8(F)                                                                     \
  {                                                                                      \
    &F<1, KuFor(1)>, &F<2, KuFor(2)>, &F<3, KuFor(3)>, &F<4, KuFor(4)>, &F<5, KuFor(5)>, \
        &F<6, KuFor(6)>, &F<7, KuFor(7)>, &F<8, KuFor(8)>                                \
  }

constexpr TileFn kBf16Scalar[] = PS_TILES4(TileBf16Scalar);
constexpr TileFn kInt8Scalar[] = PS_TILES4(TileInt8Scalar);
#if defined(PS_LOWP_X86)
constexpr TileFn kBf16Avx2[] = PS_TILES4(TileBf16Avx2);
constexpr TileFn kInt8Avx2[] = PS_TILES4(TileInt8Avx2);
constexpr TileFn kBf16Avx512[] = PS_TILES8(TileBf16Avx512);
constexpr TileFn kInt8Avx512[] = PS_TILES8(TileInt8Avx512);
constexpr TileFn kBf16Dp[] = PS_TILES8(TileBf16Dp);
#endif
#undef PS_TILES4
#undef PS_TILES8

Path SelectPath(WeightDtype dtype, LowpIsa isa) {
  const bool bf16 = dtype == WeightDtype::kBf16;
#if defined(PS_LOWP_X86)
  switch (isa) {
    case LowpIsa::kAvx512Bf16:
      if (bf16) return {kBf16Dp, 8, true};
      return {kInt8Avx512, 8, false};
    case LowpIsa::kAvx512:
      return {bf16 ? kBf16Avx512 : kInt8Avx512, 8, false};
    case LowpIsa::kAvx2:
      return {bf16 ? kBf16Avx2 : kInt8Avx2, 4, false};
    case LowpIsa::kScalar:
      break;
  }
#else
  (void)isa;
#endif
  return {bf16 ? kBf16Scalar : kInt8Scalar, 4, false};
}

}  // namespace

absl::string_view LowpIsaName(LowpIsa isa) {
  switch (isa) {
    case LowpIsa::kScalar:
      return "scalar";
    case LowpIsa::kAvx2:
      return "avx2";
    case LowpIsa::kAvx512:
      return "avx512";
    case LowpIsa::kAvx512Bf16:
      return "avx512bf16";
  }
  return "unknown";
}

std::vector<LowpIsa> SupportedLowpIsas() {
  static const std::vector<LowpIsa> isas = [] {
    std::vector<LowpIsa> v = {LowpIsa::kScalar};
#if defined(PS_LOWP_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      v.push_back(LowpIsa::kAvx2);
    }
    // __builtin_cpu_supports also checks that the OS saves the zmm state (XCR0).
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
      v.push_back(LowpIsa::kAvx512);
      if (CpuHasAvx512Bf16()) v.push_back(LowpIsa::kAvx512Bf16);
    }
#endif
    return v;
  }();
  return isas;
}

LowpIsa BestLowpIsa() {
  // kAvx512 over kAvx512Bf16: BM_LinearDtype measured the widening path 1.3-3x faster than
  // vdpbf16ps (which needs two per pair for the hi + lo split of x) on the development machine
  // (docs/performance.md, issue 19), at decode and at prefill sizes.
  const std::vector<LowpIsa>& isas = SupportedLowpIsas();
  for (const LowpIsa isa : isas) {
    if (isa == LowpIsa::kAvx512) return isa;
  }
  return isas.back();
}

// ---- CpuLowpLinearWeight -----------------------------------------------------------------------

void CpuLowpLinearWeight::FreeDeleter::operator()(void* p) const { std::free(p); }

absl::StatusOr<std::unique_ptr<CpuLowpLinearWeight>> CpuLowpLinearWeight::Create(
    absl::Span<const float> w, int64_t n, int64_t k, WeightDtype dtype) {
  if (n < 1 || k < 1 || static_cast<int64_t>(w.size()) != n * k) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrepareLinear: weight of ", w.size(), " floats is not [", n, ", ", k, "]"));
  }
  if (dtype == WeightDtype::kFp32) {
    return absl::InvalidArgumentError("CpuLowpLinearWeight: fp32 weights use CpuLinearWeight");
  }
  std::unique_ptr<CpuLowpLinearWeight> weight(new CpuLowpLinearWeight(n, k, dtype));
  const int64_t num_panels = (n + kNR - 1) / kNR;
  weight->num_panels_ = num_panels;
  const bool bf16 = dtype == WeightDtype::kBf16;
  const int64_t pairs = weight->num_pairs();
  const int64_t data_bytes = bf16 ? num_panels * pairs * kNR * 2 * 2 : num_panels * k * kNR;
  const size_t rounded = static_cast<size_t>((data_bytes + 63) / 64 * 64);
  void* data = std::aligned_alloc(64, rounded);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate a [", n, ", ", k, "] weight"));
  }
  std::memset(data, 0, rounded);
  weight->data_.reset(data);
  weight->bytes_ = data_bytes;
  if (bf16) {
    auto* packed = static_cast<uint16_t*>(data);
    for (int64_t row = 0; row < n; ++row) {
      const int64_t p = row / kNR, j = row % kNR;
      uint16_t* panel = packed + p * pairs * kNR * 2;
      for (int64_t kk = 0; kk < k; ++kk) {
        panel[(kk / 2) * kNR * 2 + j * 2 + (kk & 1)] = FloatToBf16Bits(w[row * k + kk]);
      }
    }
    return weight;
  }
  auto* packed = static_cast<int8_t*>(data);
  weight->scales_.assign(static_cast<size_t>(num_panels * kNR), 0.0f);
  weight->bytes_ += num_panels * kNR * static_cast<int64_t>(sizeof(float));
  for (int64_t row = 0; row < n; ++row) {
    const float* src = w.data() + row * k;
    for (int64_t kk = 0; kk < k; ++kk) {
      if (!std::isfinite(src[kk])) {
        return absl::InvalidArgumentError(absl::StrCat("int8 weights: element [", row, ", ", kk,
                                                       "] is ", src[kk], ", not finite"));
      }
    }
    const float scale = Int8RowScale(src, k);
    weight->scales_[static_cast<size_t>(row)] = scale;
    int8_t* panel = packed + (row / kNR) * k * kNR;
    for (int64_t kk = 0; kk < k; ++kk) panel[kk * kNR + row % kNR] = QuantizeInt8(src[kk], scale);
  }
  return weight;
}

// ---- LinearLowp --------------------------------------------------------------------------------

void LinearLowp(ThreadPool& pool, const float* x, int64_t m, const CpuLowpLinearWeight& w, float* y,
                bool accumulate, LowpIsa isa) {
  if (m <= 0) return;
  const Path path = SelectPath(w.dtype(), isa);
  const bool bf16 = w.dtype() == WeightDtype::kBf16;
  const int64_t n = w.out_features();
  const int64_t k = w.in_features();
  const int64_t num_panels = w.num_panels();
  const int64_t pairs = w.num_pairs();
  // Decode-sized m: one row block (W streamed once); with too few panels for the pool, split rows.
  int64_t mb = m <= 2 * kMB ? m : kMB;
  const int64_t want_units = 2 * int64_t{pool.num_threads()};
  if (num_panels < want_units && m > path.mr) {
    const int64_t want_blocks = (want_units + num_panels - 1) / num_panels;
    const int64_t rows_per_block = (m + want_blocks - 1) / want_blocks;
    mb = std::min(mb, (rows_per_block + path.mr - 1) / path.mr * path.mr);
  }
  const int64_t num_row_blocks = (m + mb - 1) / mb;
  const auto body = [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint32_t> split;  // [rows, pairs, 2] of the current row block
    for (int64_t u = begin; u < end;) {
      const int64_t rb = u / num_panels;
      const int64_t p0 = u % num_panels;
      const int64_t p1 = std::min(num_panels, p0 + (end - u));
      const int64_t row0 = rb * mb;
      const int64_t rows = std::min(mb, m - row0);
      if (path.split_x) {
        split.resize(static_cast<size_t>(rows * pairs * 2));
        for (int64_t r = 0; r < rows; ++r) SplitRow(x + (row0 + r) * k, k, &split[r * pairs * 2]);
      }
      for (int64_t p = p0; p < p1; ++p) {
        TileArgs a;
        a.k = k;
        a.ldx = k;
        a.ldy = n;
        a.ldxs = pairs * 2;
        a.panel = bf16 ? static_cast<const void*>(w.bf16_panel(p))
                       : static_cast<const void*>(w.int8_panel(p));
        a.scale = bf16 ? nullptr : w.scales() + p * kNR;
        a.ncols = static_cast<int>(std::min<int64_t>(kNR, n - p * kNR));
        a.load_c = accumulate;
        for (int64_t i = 0; i < rows; i += path.mr) {
          const int mr = static_cast<int>(std::min<int64_t>(path.mr, rows - i));
          a.x = x + (row0 + i) * k;
          a.y = y + (row0 + i) * n + p * kNR;
          if (path.split_x) a.xs = split.data() + i * pairs * 2;
          path.tiles[mr - 1](a);
        }
      }
      u += p1 - p0;
    }
  };
  static_assert(kMaxMR >= 8, "tile tables hold up to 8 rows");
  const int64_t unit_macs = std::min(mb, m) * kNR * k;
  pool.ParallelFor(num_row_blocks * num_panels, GrainFor(unit_macs, kMinChunkMacs), body);
}

}  // namespace ps::kernels::cpu
