// CPU dense ops. The GEMM is a register-blocked micro-kernel over pre-packed weight panels,
// written with GCC vector extensions so one source compiles to AVX-512 (-march=native on the dev
// machine), AVX2/FMA or plain SSE2 (PS_NATIVE=OFF).
//
// Linear, y[m, n] (+)= x[m, k] W^T: W^T is packed into panels of NR = 2 vectors of output
// columns (CpuLinearWeight). A tile computes MR rows x NR columns over a k block of KC, keeping
// MR x 2 vector accumulators in registers; each weight vector loaded is used for all MR rows and
// each broadcast x element for both vectors.
//   * Threads: the work units are (row block of MB rows, panel), panel-inner; the pool splits
//     them into contiguous ranges, so at decode (one row block) threads split the panels of n and
//     W is streamed once in all, and at prefill they split row blocks x panels.
//   * Cache blocking: per k block, one panel slab [KC, NR] (32 KiB with AVX-512) stays in L1
//     while every MR-row tile of the row block runs over it; the x block [MB, KC] stays in L2.
//   * Bytes: W (4 n k) once per row block, x (4 m k) once per panel, y (4 m n) once per k block.
//   * Numerics: fp32, FMA accumulation in k order per k block; small-m tiles split k across
//     KU interleaved accumulators (to cover FMA latency), summed at the end of the block.
// The elementwise ops follow kernels/reference/ops.h; see dense.h for each one's numerics.
#include "kernels/cpu/dense.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "base/check.h"

namespace ps::kernels::cpu {
namespace {

#if defined(__AVX512F__)
constexpr int kVL = 16;  // floats per vector
constexpr int kMR = 12;  // 24 accumulators + 2 weight vectors + broadcast of 32 zmm registers
#elif defined(__AVX__)
constexpr int kVL = 8;
constexpr int kMR = 6;  // 12 accumulators of 16 ymm registers
#else
constexpr int kVL = 4;
constexpr int kMR = 6;  // 12 accumulators of 16 xmm registers
#endif
constexpr int kNR = 2 * kVL;      // panel width
constexpr int64_t kKC = 256;      // k block: panel slab kKC * kNR * 4 bytes in L1
constexpr int64_t kMB = 8 * kMR;  // rows per row block at prefill
// Below this many multiply-adds per chunk, waking workers costs more than it saves.
constexpr int64_t kMinChunkMacs = int64_t{1} << 14;

using Vec = float __attribute__((vector_size(kVL * sizeof(float))));
using IVec = int32_t __attribute__((vector_size(kVL * sizeof(int32_t))));
using DVec = double __attribute__((vector_size(kVL * sizeof(double))));

inline Vec LoadU(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreU(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline Vec Splat(float s) { return Vec{} + s; }

// One MR x NR tile over `kc` steps: c[i, 0:ncols] (+)= sum_kk a[i, kk] b[kk, :]. a: rows with
// stride lda; b: panel slab [kc, NR], 64-byte aligned; c: rows with stride ldc. `load_c`: add to
// what c holds (accumulate, or a later k block).
template <int MR, int KU>
void Tile(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc, int ncols,
          bool load_c) {
  Vec acc[KU][MR][2] = {};
  int64_t kk = 0;
  for (; kk + KU <= kc; kk += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const Vec b0 = LoadU(b + (kk + u) * kNR);
      const Vec b1 = LoadU(b + (kk + u) * kNR + kVL);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const float ai = a[i * lda + kk + u];
        acc[u][i][0] += ai * b0;
        acc[u][i][1] += ai * b1;
      }
    }
  }
  for (; kk < kc; ++kk) {
    const Vec b0 = LoadU(b + kk * kNR);
    const Vec b1 = LoadU(b + kk * kNR + kVL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i * lda + kk];
      acc[0][i][0] += ai * b0;
      acc[0][i][1] += ai * b1;
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < KU; ++u) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      acc[0][i][0] += acc[u][i][0];
      acc[0][i][1] += acc[u][i][1];
    }
  }
  if (ncols == kNR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      if (load_c) {
        StoreU(ci, LoadU(ci) + acc[0][i][0]);
        StoreU(ci + kVL, LoadU(ci + kVL) + acc[0][i][1]);
      } else {
        StoreU(ci, acc[0][i][0]);
        StoreU(ci + kVL, acc[0][i][1]);
      }
    }
    return;
  }
  // The last, partial panel.
  for (int i = 0; i < MR; ++i) {
    float tmp[kNR];
    StoreU(tmp, acc[0][i][0]);
    StoreU(tmp + kVL, acc[0][i][1]);
    float* ci = c + i * ldc;
    for (int j = 0; j < ncols; ++j) ci[j] = load_c ? ci[j] + tmp[j] : tmp[j];
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool);

// Enough independent accumulators (>= 8 vectors) to hide FMA latency at small MR.
constexpr int KuFor(int mr) { return mr == 1 ? 4 : (mr <= 3 ? 2 : 1); }

template <int... I>
constexpr auto MakeTileTable(std::integer_sequence<int, I...>) {
  return std::array<TileFn, sizeof...(I)>{&Tile<I + 1, KuFor(I + 1)>...};
}
// kTiles[mr - 1]: the tile of mr rows, 1 <= mr <= kMR.
constexpr auto kTiles = MakeTileTable(std::make_integer_sequence<int, kMR>{});

// ---- elementwise helpers ----------------------------------------------------------------------

// exp(x) in fp32 (Cephes expf: range reduction by ln 2 in two parts, degree-6 polynomial, 2^n
// through the exponent bits); about 1 ulp. Inputs are clamped to [-87, 88] (no inf, no denormal).
inline Vec ExpV(Vec x) {
  const Vec lo = Splat(-87.0f);
  const Vec hi = Splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  const Vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec y = p * (r * r) + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3).
inline Vec GeluV(Vec x) {
  constexpr float kTwoSqrt2OverPi = 2.0f * 0.7978845608028654f;
  const Vec z = (x + 0.044715f * x * x * x) * -kTwoSqrt2OverPi;
  return x / (1.0f + ExpV(z));
}

// Applies GeluV to n floats of `in`, writing `out` (may be the same), times `mul` if non-null.
void GeluRange(const float* in, const float* mul, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + kVL <= n; i += kVL) {
    Vec g = GeluV(LoadU(in + i));
    if (mul != nullptr) g *= LoadU(mul + i);
    StoreU(out + i, g);
  }
  if (i < n) {
    float tmp[kVL] = {};
    float tmp_mul[kVL] = {};
    const int64_t rest = n - i;
    std::memcpy(tmp, in + i, rest * sizeof(float));
    if (mul != nullptr) std::memcpy(tmp_mul, mul + i, rest * sizeof(float));
    Vec g = GeluV(LoadU(tmp));
    if (mul != nullptr) g *= LoadU(tmp_mul);
    StoreU(tmp, g);
    std::memcpy(out + i, tmp, rest * sizeof(float));
  }
}

// sum_i x[i] and sum_i (x[i] - mean)^2 in double, vectorised.
double SumD(const float* x, int64_t n) {
  DVec acc0 = {};
  DVec acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kVL <= n; i += 2 * kVL) {
    acc0 += __builtin_convertvector(LoadU(x + i), DVec);
    acc1 += __builtin_convertvector(LoadU(x + i + kVL), DVec);
  }
  acc0 += acc1;
  double sum = 0.0;
  for (int j = 0; j < kVL; ++j) sum += acc0[j];
  for (; i < n; ++i) sum += x[i];
  return sum;
}
double SumSqDevD(const float* x, int64_t n, double mean) {
  DVec acc0 = {};
  DVec acc1 = {};
  const DVec mv = DVec{} + mean;
  int64_t i = 0;
  for (; i + 2 * kVL <= n; i += 2 * kVL) {
    const DVec d0 = __builtin_convertvector(LoadU(x + i), DVec) - mv;
    const DVec d1 = __builtin_convertvector(LoadU(x + i + kVL), DVec) - mv;
    acc0 += d0 * d0;
    acc1 += d1 * d1;
  }
  acc0 += acc1;
  double sum = 0.0;
  for (int j = 0; j < kVL; ++j) sum += acc0[j];
  for (; i < n; ++i) sum += (x[i] - mean) * (x[i] - mean);
  return sum;
}

// Grain (in units of `unit_cost` work each) so that a chunk is worth a thread wake-up.
int64_t GrainFor(int64_t unit_cost, int64_t min_cost) {
  return std::max<int64_t>(1, (min_cost + unit_cost - 1) / std::max<int64_t>(1, unit_cost));
}
constexpr int64_t kMinChunkElems = int64_t{1} << 14;  // elementwise ops

}  // namespace

// ---- CpuLinearWeight ----------------------------------------------------------------------------

const int64_t CpuLinearWeight::kPanelWidth = kNR;

void CpuLinearWeight::FreeDeleter::operator()(float* p) const { std::free(p); }

CpuLinearWeight::CpuLinearWeight(int64_t n, int64_t k) : LinearWeight(n, k) {}

std::unique_ptr<CpuLinearWeight> CpuLinearWeight::Create(absl::Span<const float> w, int64_t n,
                                                         int64_t k) {
  PS_DCHECK(n >= 1 && k >= 1 && static_cast<int64_t>(w.size()) == n * k);
  std::unique_ptr<CpuLinearWeight> weight(new CpuLinearWeight(n, k));
  weight->num_panels_ = (n + kNR - 1) / kNR;
  const size_t bytes = static_cast<size_t>(weight->num_panels_ * k * kNR) * sizeof(float);
  void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (data == nullptr) throw std::bad_alloc();
  weight->data_.reset(static_cast<float*>(data));
  float* packed = weight->data_.get();
  for (int64_t p = 0; p < weight->num_panels_; ++p) {
    float* panel = packed + p * k * kNR;
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t row = p * kNR + j;
        panel[kk * kNR + j] = row < n ? w[row * k + kk] : 0.0f;
      }
    }
  }
  return weight;
}

// ---- Linear -------------------------------------------------------------------------------------

void Linear(ThreadPool& pool, const float* x, int64_t m, const CpuLinearWeight& w, float* y,
            bool accumulate) {
  if (m <= 0) return;
  const int64_t n = w.out_features();
  const int64_t k = w.in_features();
  const int64_t num_panels = w.num_panels();
  // Decode-sized m: one row block, so each weight element is loaded once for all rows; but with
  // too few panels to occupy the pool (n = 32: the sketch MLPs' down projection), split rows.
  int64_t mb = m <= 2 * kMB ? m : kMB;
  const int64_t want_units = 2 * int64_t{pool.num_threads()};
  if (num_panels < want_units && m > kMR) {
    const int64_t want_blocks = (want_units + num_panels - 1) / num_panels;
    const int64_t rows_per_block = (m + want_blocks - 1) / want_blocks;
    mb = std::min(mb, (rows_per_block + kMR - 1) / kMR * kMR);
  }
  const int64_t num_row_blocks = (m + mb - 1) / mb;
  const int64_t num_kb = (k + kKC - 1) / kKC;
  const int64_t kc_step = (k + num_kb - 1) / num_kb;  // even k blocks
  const auto body = [&](int64_t begin, int64_t end) {
    // Units u = row_block * num_panels + panel; [begin, end) spans one or more row blocks.
    for (int64_t u = begin; u < end;) {
      const int64_t rb = u / num_panels;
      const int64_t p0 = u % num_panels;
      const int64_t p1 = std::min(num_panels, p0 + (end - u));
      const int64_t row0 = rb * mb;
      const int64_t rows = std::min(mb, m - row0);
      for (int64_t k0 = 0; k0 < k; k0 += kc_step) {
        const int64_t kc = std::min(kc_step, k - k0);
        const bool load_c = accumulate || k0 > 0;
        for (int64_t p = p0; p < p1; ++p) {
          const float* slab = w.panel(p) + k0 * kNR;
          const int ncols = static_cast<int>(std::min<int64_t>(kNR, n - p * kNR));
          for (int64_t i = 0; i < rows; i += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - i));
            const int64_t row = row0 + i;
            kTiles[mr - 1](x + row * k + k0, k, slab, kc, y + row * n + p * kNR, n, ncols, load_c);
          }
        }
      }
      u += p1 - p0;
    }
  };
  const int64_t unit_macs = std::min(mb, m) * kNR * k;
  pool.ParallelFor(num_row_blocks * num_panels, GrainFor(unit_macs, kMinChunkMacs), body);
}

// ---- LayerNorm ----------------------------------------------------------------------------------

void LayerNorm(ThreadPool& pool, const float* x, int64_t rows, int64_t n, const float* gamma,
               const float* beta, float eps, float* y) {
  pool.ParallelFor(rows, GrainFor(n, kMinChunkElems), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = x + row * n;
      float* yr = y + row * n;
      const double mean = SumD(xr, n) / static_cast<double>(n);
      const double var = SumSqDevD(xr, n, mean) / static_cast<double>(n);
      const double inv_std = 1.0 / std::sqrt(var + static_cast<double>(eps));
      // Same expression as reference::LayerNorm, in double, rounded once.
      int64_t i = 0;
      const DVec mv = DVec{} + mean;
      for (; i + kVL <= n; i += kVL) {
        const DVec xv = __builtin_convertvector(LoadU(xr + i), DVec);
        const DVec gv = __builtin_convertvector(LoadU(gamma + i), DVec);
        const DVec bv = __builtin_convertvector(LoadU(beta + i), DVec);
        StoreU(yr + i, __builtin_convertvector((xv - mv) * inv_std * gv + bv, Vec));
      }
      for (; i < n; ++i) {
        yr[i] = static_cast<float>((xr[i] - mean) * inv_std * gamma[i] + beta[i]);
      }
    }
  });
}

// ---- Embed, SplitQkvRope, Rope ------------------------------------------------------------------

void Embed(ThreadPool& pool, const float* table, int64_t d, absl::Span<const int32_t> tokens,
           absl::Span<const int64_t> positions, bool sinusoidal, float* x) {
  PS_DCHECK(tokens.size() == positions.size() && d % 2 == 0);
  const int64_t m = static_cast<int64_t>(tokens.size());
  if (!sinusoidal) {
    pool.ParallelFor(m, GrainFor(d, kMinChunkElems), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        std::memcpy(x + row * d, table + static_cast<int64_t>(tokens[row]) * d, d * sizeof(float));
      }
    });
    return;
  }
  const int64_t half = d / 2;
  std::vector<double> freq(half);  // as reference::Sinusoidal
  for (int64_t i = 0; i < half; ++i) {
    freq[i] = std::pow(10000.0, -static_cast<double>(i) / static_cast<double>(half));
  }
  pool.ParallelFor(m, GrainFor(d * 8, kMinChunkElems), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* e = table + static_cast<int64_t>(tokens[row]) * d;
      const double t = static_cast<double>(positions[row]);
      float* xr = x + row * d;
      for (int64_t i = 0; i < half; ++i) {
        const double angle = t * freq[i];
        xr[2 * i] = static_cast<float>(e[2 * i] + std::sin(angle));
        xr[2 * i + 1] = static_cast<float>(e[2 * i + 1] + std::cos(angle));
      }
    }
  });
}

namespace {

// theta_i = 10000^(-2i/h), i < h/2: as reference::Rope.
std::vector<double> RopeTheta(int64_t h) {
  std::vector<double> theta(static_cast<size_t>(h / 2));
  for (int64_t i = 0; i < h / 2; ++i) {
    theta[i] = std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(h));
  }
  return theta;
}

// cs[2i], cs[2i+1] = cos, sin of t * theta[i]: shared by every head of a row, q and k.
void RopeAngles(const std::vector<double>& theta, int64_t t, double* cs) {
  for (size_t i = 0; i < theta.size(); ++i) {
    const double angle = static_cast<double>(t) * theta[i];
    cs[2 * i] = std::cos(angle);
    cs[2 * i + 1] = std::sin(angle);
  }
}

// One head, as reference::Rope: y[i] = x[2i] c - x[2i+1] s, y[h/2 + i] = x[2i+1] c + x[2i] s.
void RotateHead(const float* xh, const double* cs, int64_t half, float* yh) {
  for (int64_t i = 0; i < half; ++i) {
    const double c = cs[2 * i];
    const double s = cs[2 * i + 1];
    const double even = xh[2 * i];
    const double odd = xh[2 * i + 1];
    yh[i] = static_cast<float>(even * c - odd * s);
    yh[half + i] = static_cast<float>(odd * c + even * s);
  }
}

}  // namespace

void SplitQkvRope(ThreadPool& pool, const float* qkv, int64_t heads, int64_t head_dim,
                  absl::Span<const int64_t> positions, bool rope, float* q, float* k, float* v) {
  PS_DCHECK(head_dim % 2 == 0);
  const int64_t m = static_cast<int64_t>(positions.size());
  const int64_t h = head_dim;
  const int64_t half = h / 2;
  const int64_t D = heads * h;
  if (!rope) {
    pool.ParallelFor(m, GrainFor(3 * D, kMinChunkElems), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* src = qkv + row * 3 * D;
        std::memcpy(q + row * D, src, D * sizeof(float));
        std::memcpy(k + row * D, src + D, D * sizeof(float));
        std::memcpy(v + row * D, src + 2 * D, D * sizeof(float));
      }
    });
    return;
  }
  const std::vector<double> theta = RopeTheta(h);
  pool.ParallelFor(m, GrainFor(3 * D + 8 * half, kMinChunkElems), [&](int64_t begin, int64_t end) {
    std::vector<double> cs(2 * half);
    for (int64_t row = begin; row < end; ++row) {
      RopeAngles(theta, positions[row], cs.data());
      const float* src = qkv + row * 3 * D;
      for (int64_t head = 0; head < heads; ++head) {
        RotateHead(src + head * h, cs.data(), half, q + row * D + head * h);
        RotateHead(src + D + head * h, cs.data(), half, k + row * D + head * h);
      }
      std::memcpy(v + row * D, src + 2 * D, D * sizeof(float));
    }
  });
}

void Rope(ThreadPool& pool, const float* x, int64_t heads, int64_t head_dim,
          absl::Span<const int64_t> positions, float* y) {
  PS_DCHECK(head_dim % 2 == 0);
  const int64_t m = static_cast<int64_t>(positions.size());
  const int64_t h = head_dim;
  const int64_t half = h / 2;
  const int64_t D = heads * h;
  const std::vector<double> theta = RopeTheta(h);
  pool.ParallelFor(m, GrainFor(D + 8 * half, kMinChunkElems), [&](int64_t begin, int64_t end) {
    std::vector<double> cs(2 * half);
    for (int64_t row = begin; row < end; ++row) {
      RopeAngles(theta, positions[row], cs.data());
      for (int64_t head = 0; head < heads; ++head) {
        RotateHead(x + row * D + head * h, cs.data(), half, y + row * D + head * h);
      }
    }
  });
}

// ---- GELU and elementwise -----------------------------------------------------------------------

void GeluGate(ThreadPool& pool, const float* up, int64_t m, int64_t f, float* out) {
  pool.ParallelFor(m, GrainFor(f, kMinChunkElems / 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      GeluRange(up + row * 2 * f + f, up + row * 2 * f, f, out + row * f);
    }
  });
}

void Gelu(ThreadPool& pool, float* x, int64_t n) {
  pool.ParallelFor(n, kMinChunkElems / 4, [&](int64_t begin, int64_t end) {
    GeluRange(x + begin, nullptr, end - begin, x + begin);
  });
}

void Multiply(ThreadPool& pool, const float* a, const float* b, int64_t n, float* out) {
  pool.ParallelFor(n, kMinChunkElems * 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = a[i] * b[i];
  });
}

void SketchCombine(ThreadPool& pool, const float* f1, const float* f2, int64_t rows, int64_t r,
                   float* psi) {
  const double sqrt_r = std::sqrt(static_cast<double>(r));
  pool.ParallelFor(rows * r, kMinChunkElems / 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double z = static_cast<double>(f1[i]) * f2[i];
      psi[i] = static_cast<float>(sqrt_r * std::tanh(z / sqrt_r));
    }
  });
}

void AddBias(ThreadPool& pool, float* y, int64_t m, int64_t n, const float* bias) {
  pool.ParallelFor(m, GrainFor(n, kMinChunkElems * 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* yr = y + row * n;
      for (int64_t j = 0; j < n; ++j) yr[j] += bias[j];
    }
  });
}

}  // namespace ps::kernels::cpu
