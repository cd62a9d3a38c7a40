// KV-cache attention kernels (algorithm.md section 2; semantics in kernels/backend.h).
// Decode: per (sequence, head, key range) one pass over the rows the query sees (every kept row;
// sparse_strided: the visible runs, window + t / stride of the t + 1 rows) in tiles of kDecodeTile
// keys: scores by vectorised dot products over h, one rescale of the running sum per tile (online
// softmax), then the weighted value rows added with the accumulator held in registers. A cache
// too long for B*H items to keep the pool busy is split into ranges of >= kMinSplitKeys keys whose
// partial (max, sum, acc) are merged in double (flash-decoding). Bytes: the attended keys and
// values once, 2 * rows * H * h * 4 per sequence; decode is bound by that stream.
// Prefill: per (head, tile of kQueryTile queries) the keys are walked in tiles of kKeyTile (cached
// rows, then the chunk's own tokens up to the tile's last query). Each key tile is transposed once
// so that Q K^T is broadcast FMAs over 64 key lanes, and P V runs two queries per pass over the
// value rows (GEMM-style register blocking); scores are masked per pair, and a tile the mask hides
// from every query of the query tile (window, chunk; stride only when the stride exceeds the
// tiles, so a strided prefill costs about as much as a causal one) is skipped whole. The cache is
// updated only after every output is computed. Never more than a 32 x 64 score block in memory.
// Numerics: fp32 products and sums; exp by a degree-7 polynomial after range reduction (relative
// error ~1e-7, vectorises); polynomial weights (x*x)*(x*x), normaliser 1 + sum w with the 1 exact.
// fp16 caches (shape.cache_dtype): rows are rounded to binary16 on write (F16C, half_convert.h)
// and widened a tile at a time into an L1 scratch block before the same fp32 loops run, so a
// decode step streams 2 * rows * H * h * 2 bytes, half the fp32 cache's. Prefill rounds the
// chunk's own keys and values the same way before using them, so prefill == decode steps holds.
#include "kernels/cpu/kv_attention.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "base/check.h"
#include "kernels/cpu/half_convert.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define PS_KV_X86 1
#else
#define PS_KV_X86 0
#endif

namespace ps::kernels::cpu {
namespace {

constexpr int64_t kLanes = 16;          // floats per vector (one zmm register)
constexpr int64_t kDecodeTile = 64;     // keys per online-softmax rescale in decode
constexpr int64_t kMinSplitKeys = 128;  // fewest keys one decode split handles
constexpr int64_t kQueryTile = 32;      // prefill queries per work item
constexpr int64_t kKeyTile = 64;        // prefill keys per score block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Kind = KeyMask::Kind;

// 16 floats: one AVX-512 register with -march=native, four SSE registers without. Only used for
// locals (never as a parameter or return type, whose ABI would depend on the target flags).
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef int32_t Int16 __attribute__((vector_size(64)));

inline float Dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
  if (n >= kLanes) {
    Vec16 acc = {};
    for (; i + kLanes <= n; i += kLanes) {
      Vec16 x, y;
      std::memcpy(&x, a + i, sizeof(x));
      std::memcpy(&y, b + i, sizeof(y));
      acc += x * y;
    }
    const Vec8 half = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
    const Vec4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) +
                         __builtin_shufflevector(half, half, 4, 5, 6, 7);
    sum = (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
  }
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[0, h) += sum_j p[j] * rows[j][0, h), j < nk: the accumulators stay in registers while the
// rows stream through, 64 columns (four independent FMA chains) at a time.
inline void AccumulateRows(const float* p, const float* const* rows, int64_t nk, int64_t h,
                           float* acc, int64_t first_column = 0) {
  int64_t c = first_column;
  for (; c + 4 * kLanes <= h; c += 4 * kLanes) {
    Vec16 a0, a1, a2, a3;
    std::memcpy(&a0, acc + c, sizeof(a0));
    std::memcpy(&a1, acc + c + kLanes, sizeof(a1));
    std::memcpy(&a2, acc + c + 2 * kLanes, sizeof(a2));
    std::memcpy(&a3, acc + c + 3 * kLanes, sizeof(a3));
    for (int64_t j = 0; j < nk; ++j) {
      const float* row = rows[j] + c;
      Vec16 x0, x1, x2, x3;
      std::memcpy(&x0, row, sizeof(x0));
      std::memcpy(&x1, row + kLanes, sizeof(x1));
      std::memcpy(&x2, row + 2 * kLanes, sizeof(x2));
      std::memcpy(&x3, row + 3 * kLanes, sizeof(x3));
      a0 += p[j] * x0;
      a1 += p[j] * x1;
      a2 += p[j] * x2;
      a3 += p[j] * x3;
    }
    std::memcpy(acc + c, &a0, sizeof(a0));
    std::memcpy(acc + c + kLanes, &a1, sizeof(a1));
    std::memcpy(acc + c + 2 * kLanes, &a2, sizeof(a2));
    std::memcpy(acc + c + 3 * kLanes, &a3, sizeof(a3));
  }
  for (; c + kLanes <= h; c += kLanes) {
    Vec16 a0, a1 = {};
    std::memcpy(&a0, acc + c, sizeof(a0));
    int64_t j = 0;
    for (; j + 2 <= nk; j += 2) {
      Vec16 x0, x1;
      std::memcpy(&x0, rows[j] + c, sizeof(x0));
      std::memcpy(&x1, rows[j + 1] + c, sizeof(x1));
      a0 += p[j] * x0;
      a1 += p[j + 1] * x1;
    }
    if (j < nk) {
      Vec16 x0;
      std::memcpy(&x0, rows[j] + c, sizeof(x0));
      a0 += p[j] * x0;
    }
    a0 += a1;
    std::memcpy(acc + c, &a0, sizeof(a0));
  }
  for (; c < h; ++c) {
    float a = acc[c];
    for (int64_t j = 0; j < nk; ++j) a += p[j] * rows[j][c];
    acc[c] = a;
  }
}

// max of x[0, 64) (a score tile, padded with -inf), in vector steps (a serial max is a chain).
inline float MaxOfTile(const float* x) {
  Vec16 v[4];
  std::memcpy(v, x, sizeof(v));
  const Vec16 m01 = v[0] > v[1] ? v[0] : v[1];
  const Vec16 m23 = v[2] > v[3] ? v[2] : v[3];
  const Vec16 m = m01 > m23 ? m01 : m23;
  float result = m[0];
  for (int l = 1; l < kLanes; ++l) result = std::max(result, m[l]);
  return result;
}

// AccumulateRows for two queries at once (p0 -> acc0, p1 -> acc1): every row load feeds two
// FMAs, and eight independent chains hide the FMA latency.
inline void AccumulateRowsPair(const float* p0, const float* p1, const float* const* rows,
                               int64_t nk, int64_t h, float* acc0, float* acc1) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= h; c += 4 * kLanes) {
    Vec16 a[4], b[4];
    std::memcpy(&a, acc0 + c, sizeof(a));
    std::memcpy(&b, acc1 + c, sizeof(b));
    Vec16 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    Vec16 b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    for (int64_t j = 0; j < nk; ++j) {
      const float* row = rows[j] + c;
      Vec16 x0, x1, x2, x3;
      std::memcpy(&x0, row, sizeof(x0));
      std::memcpy(&x1, row + kLanes, sizeof(x1));
      std::memcpy(&x2, row + 2 * kLanes, sizeof(x2));
      std::memcpy(&x3, row + 3 * kLanes, sizeof(x3));
      a0 += p0[j] * x0;
      a1 += p0[j] * x1;
      a2 += p0[j] * x2;
      a3 += p0[j] * x3;
      b0 += p1[j] * x0;
      b1 += p1[j] * x1;
      b2 += p1[j] * x2;
      b3 += p1[j] * x3;
    }
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
    b[0] = b0, b[1] = b1, b[2] = b2, b[3] = b3;
    std::memcpy(acc0 + c, &a, sizeof(a));
    std::memcpy(acc1 + c, &b, sizeof(b));
  }
  if (c < h) {
    AccumulateRows(p0, rows, nk, h, acc0, c);
    AccumulateRows(p1, rows, nk, h, acc1, c);
  }
}

// Scores of two queries q0, q1 [h] against a transposed key tile keys_t [h, 64]: out0, out1 [64].
// Every K^T load feeds two FMAs; eight independent chains.
inline void ScorePair(const float* q0, const float* q1, const float* keys_t, int64_t h, float* out0,
                      float* out1) {
  Vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  for (int64_t d = 0; d < h; ++d) {
    const float* kt = keys_t + d * 4 * kLanes;
    Vec16 x0, x1, x2, x3;
    std::memcpy(&x0, kt, sizeof(x0));
    std::memcpy(&x1, kt + kLanes, sizeof(x1));
    std::memcpy(&x2, kt + 2 * kLanes, sizeof(x2));
    std::memcpy(&x3, kt + 3 * kLanes, sizeof(x3));
    a0 += q0[d] * x0;
    a1 += q0[d] * x1;
    a2 += q0[d] * x2;
    a3 += q0[d] * x3;
    b0 += q1[d] * x0;
    b1 += q1[d] * x1;
    b2 += q1[d] * x2;
    b3 += q1[d] * x3;
  }
  const Vec16 a[4] = {a0, a1, a2, a3};
  const Vec16 b[4] = {b0, b1, b2, b3};
  std::memcpy(out0, a, sizeof(a));
  std::memcpy(out1, b, sizeof(b));
}

// Sum of x[0, n) with independent partial sums (the serial chain would cost 4 cycles a term).
inline float Sum(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l];
  }
  float sum = 0.0f;
  for (; j < n; ++j) sum += x[j];
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

inline void Scale(float c, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= c;
}

// x[j] = e^(x[j] - m) for j < n rounded up to a multiple of 16 (the caller pads x with -inf, so
// the padding becomes 0). Every x[j] - m <= 0 or -inf; results below e^-87 are flushed to 0.
// Range reduction x = k ln2 + r, |r| <= ln2/2 (k by the 1.5 * 2^23 rounding trick), Taylor to r^7
// (truncation < 1e-8 relative), 2^k built in the exponent bits. Vectorised, no libm call.
inline void ExpShifted(float* x, int64_t n, float m) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 zero = {};
  const Vec16 floor_value = zero - 87.0f;
  const Int16 round_bits = Int16{} + std::bit_cast<int32_t>(kRound);
  for (int64_t j = 0; j < n; j += kLanes) {
    Vec16 v;
    std::memcpy(&v, x + j, sizeof(v));
    v -= m;
    const Vec16 clamped = v < floor_value ? floor_value : v;
    const Vec16 t = clamped * 1.44269504088896341f + kRound;
    const Vec16 k = t - kRound;
    const Vec16 r = clamped - k * 0.693359375f + k * 2.12194440e-4f;  // Cephes' split of ln 2
    Vec16 p = zero + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // Bit casts by memcpy: std::bit_cast would return a vector by value (a target-dependent ABI).
    Int16 t_bits;
    std::memcpy(&t_bits, &t, sizeof(t_bits));
    const Int16 scale_bits = ((t_bits - round_bits) + 127) << 23;
    Vec16 scale;
    std::memcpy(&scale, &scale_bits, sizeof(scale));
    Vec16 result = p * scale;
    result = v < floor_value ? zero : result;
    std::memcpy(x + j, &result, sizeof(result));
  }
}

// --- mask helpers: Visible(i, j) == j <= i && (Always(j) || Near(i, j)) ----------------------

// Keys every later query sees.
inline bool Always(const KeyMask& mask, int64_t j) {
  switch (mask.kind) {
    case Kind::kCausal:
      return true;
    case Kind::kWindow:
    case Kind::kStrided:
      return false;
    case Kind::kFixed:
      return j % mask.chunk >= mask.chunk - mask.summary;
  }
  return true;
}

// The group Near compares: the chunk for kFixed, the position otherwise.
inline int64_t Group(const KeyMask& mask, int64_t j) {
  return mask.kind == Kind::kFixed ? j / mask.chunk : j;
}

inline bool Near(const KeyMask& mask, int64_t query_group, int64_t key_group) {
  switch (mask.kind) {
    case Kind::kCausal:
      return true;
    case Kind::kWindow:
      return query_group - key_group < mask.window;
    case Kind::kStrided:
      return query_group - key_group < mask.window || (query_group - key_group) % mask.stride == 0;
    case Kind::kFixed:
      return query_group == key_group;
  }
  return true;
}

// Whether no query in [i_first, i_last] sees any key in [j_first, j_last] (j_last <= i_first is
// required; keys in that range need not all be present).
inline bool TileHidden(const KeyMask& mask, int64_t i_first, int64_t i_last, int64_t j_first,
                       int64_t j_last) {
  switch (mask.kind) {
    case Kind::kCausal:
      return false;
    case Kind::kWindow:
      return i_first - j_last >= mask.window;
    case Kind::kStrided: {
      // Distances i - j span [lo, hi]: hidden when all are past the window and none is a
      // multiple of the stride.
      const int64_t lo = i_first - j_last, hi = i_last - j_first;
      return lo >= mask.window && hi / mask.stride == (lo - 1) / mask.stride;
    }
    case Kind::kFixed:
      // Visibility is monotone here: keys of an earlier chunk than the first query's are hidden
      // from the whole tile, summaries apart (the caller checks those).
      return j_last / mask.chunk != i_first / mask.chunk;
  }
  return false;
}

// --- cache rows: fp32 or binary16 storage ---------------------------------------------------

inline bool IsHalf(const KvAttentionShape& shape) {
  return shape.cache_dtype == KvCacheDtype::kFp16;
}

// Bytes of one cache row [H, h].
inline size_t RowBytes(const KvAttentionShape& shape) {
  return static_cast<size_t>(shape.heads * shape.head_dim) *
         (IsHalf(shape) ? sizeof(uint16_t) : sizeof(float));
}

inline std::byte* KeyBytes(const KvAttentionShape& shape, const KvSlotState& slot) {
  return IsHalf(shape) ? reinterpret_cast<std::byte*>(slot.keys_f16)
                       : reinterpret_cast<std::byte*>(slot.keys);
}

inline std::byte* ValueBytes(const KvAttentionShape& shape, const KvSlotState& slot) {
  return IsHalf(shape) ? reinterpret_cast<std::byte*>(slot.values_f16)
                       : reinterpret_cast<std::byte*>(slot.values);
}

// Writes the fp32 row src [H, h] into the cache row at dst (rounded to binary16 for fp16 caches).
inline void StoreRow(const KvAttentionShape& shape, const float* src, std::byte* dst) {
  const int64_t n = shape.heads * shape.head_dim;
  if (IsHalf(shape)) {
    FloatToHalf(src, n, reinterpret_cast<uint16_t*>(dst));
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  }
}

// --- decode ----------------------------------------------------------------------------------

// List cache: drops the rows that neither query position t nor a later one sees, keeping the
// rest in order. Causal and strided masks never drop; the others compare integers per row and
// move only what follows a gap.
void DropUnkept(const KvAttentionShape& shape, int64_t t, const KvSlotState& slot) {
  if (shape.mask.KeepsEveryKey()) return;
  const size_t row_bytes = RowBytes(shape);
  std::byte* keys = KeyBytes(shape, slot);
  std::byte* values = ValueBytes(shape, slot);
  const int64_t count = *slot.count;
  int64_t kept = 0;
  for (int64_t r = 0; r < count; ++r) {
    if (!shape.mask.Kept(t, slot.positions[r])) continue;
    if (kept != r) {
      slot.positions[kept] = slot.positions[r];
      std::memcpy(keys + kept * row_bytes, keys + r * row_bytes, row_bytes);
      std::memcpy(values + kept * row_bytes, values + r * row_bytes, row_bytes);
    }
    ++kept;
  }
  *slot.count = kept;
}

// Appends (k_row, v_row) at position t to one sequence's cache and drops what no query from t on
// sees.
void AppendDecode(const KvAttentionShape& shape, int64_t t, const KvSlotState& slot,
                  const float* k_row, const float* v_row) {
  const size_t row_bytes = RowBytes(shape);
  std::byte* keys = KeyBytes(shape, slot);
  std::byte* values = ValueBytes(shape, slot);
  if (shape.ring) {
    PS_DCHECK(*slot.count == t);
    const int64_t r = t % shape.capacity;
    StoreRow(shape, k_row, keys + r * row_bytes);
    StoreRow(shape, v_row, values + r * row_bytes);
    ++*slot.count;
    return;
  }
  int64_t count = *slot.count;
  PS_DCHECK(count < shape.capacity);
  PS_DCHECK(count == 0 || slot.positions[count - 1] < t);
  StoreRow(shape, k_row, keys + count * row_bytes);
  StoreRow(shape, v_row, values + count * row_bytes);
  slot.positions[count++] = t;
  *slot.count = count;
  DropUnkept(shape, t, slot);
}

// Partial result of one key range for one (sequence, head): softmax: running max m, sum l and
// acc = sum e^(s - m) v; polynomial: l = sum w, acc = sum w v (m unused).
struct Partial {
  float m = kNegInf;
  float l = 0.0f;
};

// Attends query q [h] over the cache rows rows.Key(v), v in [r0, r1) (keys/values of this head,
// `stride` elements apart: float, or binary16 bits for fp16 caches, which are widened a tile at a
// time into `tile` [2, kDecodeTile, h]).
Partial AttendRange(const KvAttentionShape& shape, const float* q, const void* keys,
                    const void* values, int64_t stride, const VisibleRuns& rows, int64_t r0,
                    int64_t r1, float* acc, float* tile) {
  const int64_t h = shape.head_dim;
  std::fill(acc, acc + h, 0.0f);
  Partial part;
  const bool polynomial = shape.weighting == KvWeighting::kPolynomial;
  const bool half = IsHalf(shape);
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  float scores[kDecodeTile];
  const float* value_rows[kDecodeTile];
  const float* key_rows[kDecodeTile];
  const uint16_t* key_half[kDecodeTile];
  const uint16_t* value_half[kDecodeTile];
  for (int64_t t0 = r0; t0 < r1; t0 += kDecodeTile) {
    const int64_t nt = std::min(kDecodeTile, r1 - t0);
    if (half) {
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t row = rows.Key(t0 + j);
        key_half[j] = static_cast<const uint16_t*>(keys) + row * stride;
        value_half[j] = static_cast<const uint16_t*>(values) + row * stride;
        key_rows[j] = tile + j * h;
        value_rows[j] = tile + (kDecodeTile + j) * h;
      }
      HalfRowsToFloat(key_half, nt, h, tile);
      HalfRowsToFloat(value_half, nt, h, tile + kDecodeTile * h);
    } else {
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t row = rows.Key(t0 + j);
        key_rows[j] = static_cast<const float*>(keys) + row * stride;
        value_rows[j] = static_cast<const float*>(values) + row * stride;
      }
    }
    if (polynomial) {
      for (int64_t j = 0; j < nt; ++j) {
        const float x = Dot(q, key_rows[j], h);
        scores[j] = (x * x) * (x * x);
      }
      part.l += Sum(scores, nt);
      AccumulateRows(scores, value_rows, nt, h, acc);
      continue;
    }
    for (int64_t j = 0; j < nt; ++j) scores[j] = Dot(q, key_rows[j], h) * scale;
    std::fill(scores + nt, scores + kDecodeTile, kNegInf);
    static_assert(kDecodeTile == 4 * kLanes);
    const float tile_max = MaxOfTile(scores);
    if (tile_max > part.m) {
      const float c = std::exp(part.m - tile_max);  // 0 for the first tile (m = -inf)
      part.l *= c;
      Scale(c, acc, h);
      part.m = tile_max;
    }
    ExpShifted(scores, nt, part.m);
    part.l += Sum(scores, nt);
    AccumulateRows(scores, value_rows, nt, h, acc);
  }
  return part;
}

#if PS_KV_X86
// --- decode, fused AVX-512 path (KvDecodePath::kAvx512) ---------------------------------------
// The same pass as AttendRange, with the rows read straight into registers: an fp16 row is
// widened by vcvtph2ps as it is loaded (no scratch tile, no second pass), q stays in NC registers,
// the scores of 16 keys come out of one transpose-and-add tree instead of 16 horizontal sums,
// and the value rows feed two sets of NC accumulators that live in registers for the whole range.
// h = 16 NC, NC <= kMaxFusedChunks. Compiled for AVX-512F by target attribute and chosen at run
// time, so a portable build carries it too.
constexpr __mmask16 kAllLanes = 0xFFFF;

template <bool kHalf>
__attribute__((target("avx512f"))) inline __m512 Load16(const void* base, int64_t index) {
  if constexpr (kHalf) {
    const __m256i bits = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + index));
    return _mm512_maskz_cvtph_ps(kAllLanes, bits);  // zero-masked form: see half_convert.cc
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(base) + index);
  }
}

// The masked forms with every lane set throughout: GCC 12's unmasked intrinsics pass an
// "undefined" source that it then reports as maybe-uninitialized.
__attribute__((target("avx512f"))) inline __m512 Lanes0x88(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_f32x4(kAllLanes, a, b, 0x88);  // 128-bit lanes a0 a2 b0 b2
}
__attribute__((target("avx512f"))) inline __m512 Lanes0xDD(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_f32x4(kAllLanes, a, b, 0xDD);  // 128-bit lanes a1 a3 b1 b3
}

// Sum and max of the 16 lanes (once per tile of 64 keys: a plain loop is cheap enough).
__attribute__((target("avx512f"))) inline float LaneSum(__m512 x) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, x);
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}
__attribute__((target("avx512f"))) inline float LaneMax(__m512 x) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, x);
  float m = lanes[0];
  for (float v : lanes) m = std::max(m, v);
  return m;
}

// Lane j of the result = the sum of the 16 lanes of d[j].
__attribute__((target("avx512f"))) inline __m512 SumEachOf16(const __m512* d) {
  __m512 b[8];  // per 128-bit lane L: [d2i(0)+d2i(2), d2i+1(0)+(2), d2i(1)+(3), d2i+1(1)+(3)]
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAllLanes, d[2 * i], d[2 * i + 1]),
                         _mm512_maskz_unpackhi_ps(kAllLanes, d[2 * i], d[2 * i + 1]));
  }
  __m512 c[4];  // per 128-bit lane L: the lane-L sums of d[4i], d[4i+1], d[4i+2], d[4i+3]
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]);
    const __m512d y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, x, y)),
                         _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, x, y)));
  }
  // Fold the four 128-bit lanes: 0x88 picks lanes (0, 2) of each operand, 0xDD lanes (1, 3).
  const __m512 e0 = _mm512_add_ps(Lanes0x88(c[0], c[1]), Lanes0xDD(c[0], c[1]));
  const __m512 e1 = _mm512_add_ps(Lanes0x88(c[2], c[3]), Lanes0xDD(c[2], c[3]));
  return _mm512_add_ps(Lanes0x88(e0, e1), Lanes0xDD(e0, e1));
}

// One head over one tile of nt <= 64 cache rows (element offsets `offset`, of the head's first
// element): scores, the online-softmax update of `part` (polynomial: the weight sum), and the
// weighted value rows added to the two accumulator sets a0 (even rows) and a1 (odd rows).
template <int NC, bool kHalf>
__attribute__((target("avx512f"), always_inline)) inline void FusedTile(
    bool polynomial, const __m512* qv, const void* keys, const void* values, const int64_t* offset,
    int64_t nt, __m512* a0, __m512* a1, Partial& part) {
  static_assert(kDecodeTile == 4 * kLanes);
  const __m512 scale =
      _mm512_set1_ps(polynomial ? 1.0f : 1.0f / std::sqrt(static_cast<float>(NC * kLanes)));
  const __m512 fill = _mm512_set1_ps(polynomial ? 0.0f : kNegInf);  // lanes past the tile
  alignas(64) float scores[kDecodeTile];
  __m512 tile_max = _mm512_set1_ps(kNegInf);
  __m512 weight_sum = _mm512_setzero_ps();
  for (int64_t g = 0; g < kDecodeTile; g += kLanes) {
    const int64_t live = std::min<int64_t>(kLanes, nt - g);
    if (live <= 0) {
      _mm512_store_ps(scores + g, fill);
      continue;
    }
    __m512 d[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      if (j >= live) {
        d[j] = _mm512_setzero_ps();
        continue;
      }
      const int64_t o = offset[g + j];
      __m512 dot = _mm512_mul_ps(qv[0], Load16<kHalf>(keys, o));
      for (int c = 1; c < NC; ++c) {
        dot = _mm512_fmadd_ps(qv[c], Load16<kHalf>(keys, o + c * kLanes), dot);
      }
      d[j] = dot;
    }
    const __mmask16 valid = static_cast<__mmask16>(live == kLanes ? 0xFFFF : (1u << live) - 1);
    __m512 x = _mm512_mul_ps(SumEachOf16(d), scale);
    if (polynomial) {
      const __m512 x2 = _mm512_mul_ps(x, x);
      x = _mm512_mask_mov_ps(fill, valid, _mm512_mul_ps(x2, x2));
      weight_sum = _mm512_add_ps(weight_sum, x);
    } else {
      x = _mm512_mask_mov_ps(fill, valid, x);
      tile_max = _mm512_maskz_max_ps(kAllLanes, tile_max, x);
    }
    _mm512_store_ps(scores + g, x);
  }
  if (polynomial) {
    part.l += LaneSum(weight_sum);
  } else {
    const float m = LaneMax(tile_max);
    if (m > part.m) {
      const float rescale = std::exp(part.m - m);  // 0 for the first tile (m = -inf)
      const __m512 c = _mm512_set1_ps(rescale);
      part.l *= rescale;
      for (int k = 0; k < NC; ++k) {
        a0[k] = _mm512_mul_ps(a0[k], c);
        a1[k] = _mm512_mul_ps(a1[k], c);
      }
      part.m = m;
    }
    ExpShifted(scores, nt, part.m);
    part.l += Sum(scores, nt);
  }
  int64_t j = 0;
  for (; j + 2 <= nt; j += 2) {
    const __m512 p0 = _mm512_set1_ps(scores[j]);
    const __m512 p1 = _mm512_set1_ps(scores[j + 1]);
    for (int c = 0; c < NC; ++c) {
      a0[c] = _mm512_fmadd_ps(p0, Load16<kHalf>(values, offset[j] + c * kLanes), a0[c]);
      a1[c] = _mm512_fmadd_ps(p1, Load16<kHalf>(values, offset[j + 1] + c * kLanes), a1[c]);
    }
  }
  if (j < nt) {
    const __m512 p0 = _mm512_set1_ps(scores[j]);
    for (int c = 0; c < NC; ++c) {
      a0[c] = _mm512_fmadd_ps(p0, Load16<kHalf>(values, offset[j] + c * kLanes), a0[c]);
    }
  }
}

// Every head of one sequence over the cache rows rows.Key(v), v in [r0, r1) (keys / values: the
// slot's rows of `stride` elements, float or binary16 bits). Row-major: each tile of 64 rows is
// visited head after head while it sits in L2, so the cache streams from memory about in address
// order (a head-by-head walk over the whole range reads 2 to 4 lines out of every row, a row
// apart). Software prefetch of the next tiles, 1 to 4 tiles ahead, measured slower than none.
// q [H, h]; parts [H]; acc [H, h]: the unnormalised outputs. Between tiles each head's two
// accumulator sets wait in `spill` [H, 2, h].
template <int NC, bool kHalf>
__attribute__((target("avx512f"))) void AttendRowsFused(const KvAttentionShape& shape,
                                                        const float* q, const void* keys,
                                                        const void* values, int64_t stride,
                                                        const VisibleRuns& rows, int64_t r0,
                                                        int64_t r1, Partial* parts, float* acc,
                                                        float* spill) {
  constexpr int64_t h = NC * kLanes;
  const int64_t H = shape.heads;
  const bool polynomial = shape.weighting == KvWeighting::kPolynomial;
  const size_t element = kHalf ? sizeof(uint16_t) : sizeof(float);
  for (int64_t head = 0; head < H; ++head) parts[head] = Partial{};
  std::fill(spill, spill + H * 2 * h, 0.0f);
  int64_t offset[kDecodeTile];
  for (int64_t t0 = r0; t0 < r1; t0 += kDecodeTile) {
    const int64_t nt = std::min(kDecodeTile, r1 - t0);
    for (int64_t j = 0; j < nt; ++j) offset[j] = rows.Key(t0 + j) * stride;
    for (int64_t head = 0; head < H; ++head) {
      __m512 qv[NC], a0[NC], a1[NC];
      float* saved = spill + head * 2 * h;
      for (int c = 0; c < NC; ++c) {
        qv[c] = _mm512_loadu_ps(q + head * h + c * kLanes);
        a0[c] = _mm512_loadu_ps(saved + c * kLanes);
        a1[c] = _mm512_loadu_ps(saved + h + c * kLanes);
      }
      const void* head_keys = static_cast<const char*>(keys) + head * h * element;
      const void* head_values = static_cast<const char*>(values) + head * h * element;
      FusedTile<NC, kHalf>(polynomial, qv, head_keys, head_values, offset, nt, a0, a1, parts[head]);
      for (int c = 0; c < NC; ++c) {
        _mm512_storeu_ps(saved + c * kLanes, a0[c]);
        _mm512_storeu_ps(saved + h + c * kLanes, a1[c]);
      }
    }
  }
  for (int64_t head = 0; head < H; ++head) {
    const float* saved = spill + head * 2 * h;
    for (int64_t i = 0; i < h; ++i) acc[head * h + i] = saved[i] + saved[h + i];
  }
}

constexpr int64_t kMaxFusedChunks = 8;  // h <= 128: q and two accumulator sets stay in registers

// The fused loops for the cache's dtype and h (only called where FusedCovers says they apply).
template <bool kHalf>
void AttendRowsFusedDispatch(const KvAttentionShape& shape, const float* q, const void* keys,
                             const void* values, int64_t stride, const VisibleRuns& rows,
                             int64_t r0, int64_t r1, Partial* parts, float* acc, float* spill) {
#define PS_KV_FUSED_CASE(nc)                                                                    \
  case nc:                                                                                      \
    return AttendRowsFused<nc, kHalf>(shape, q, keys, values, stride, rows, r0, r1, parts, acc, \
                                      spill)
  switch (shape.head_dim / kLanes) {
    PS_KV_FUSED_CASE(1);
    PS_KV_FUSED_CASE(2);
    PS_KV_FUSED_CASE(3);
    PS_KV_FUSED_CASE(4);
    PS_KV_FUSED_CASE(5);
    PS_KV_FUSED_CASE(6);
    PS_KV_FUSED_CASE(7);
    default:
      return AttendRowsFused<8, kHalf>(shape, q, keys, values, stride, rows, r0, r1, parts, acc,
                                       spill);
  }
#undef PS_KV_FUSED_CASE
}

void AttendFused(const KvAttentionShape& shape, const float* q, const void* keys,
                 const void* values, int64_t stride, const VisibleRuns& rows, int64_t r0,
                 int64_t r1, Partial* parts, float* acc, float* spill) {
  if (IsHalf(shape)) {
    AttendRowsFusedDispatch<true>(shape, q, keys, values, stride, rows, r0, r1, parts, acc, spill);
  } else {
    AttendRowsFusedDispatch<false>(shape, q, keys, values, stride, rows, r0, r1, parts, acc, spill);
  }
}
#endif  // PS_KV_X86

// Whether `path` has its own loops for this shape (else the portable ones run).
bool FusedCovers(KvDecodePath path, const KvAttentionShape& shape) {
#if PS_KV_X86
  return path == KvDecodePath::kAvx512 && shape.head_dim % kLanes == 0 &&
         shape.head_dim / kLanes <= kMaxFusedChunks;
#else
  (void)path;
  (void)shape;
  return false;
#endif
}

void Finish(const KvAttentionShape& shape, const Partial& part, const float* acc, float* out) {
  const int64_t h = shape.head_dim;
  const float inv =
      shape.weighting == KvWeighting::kPolynomial ? 1.0f / (1.0f + part.l) : 1.0f / part.l;
  for (int64_t i = 0; i < h; ++i) out[i] = acc[i] * inv;
}

// The cache rows query position t attends to after its step's append (and drop): every row, or
// under sparse_strided (every key kept, so row r holds position r) the visible runs, window +
// t / stride of the t + 1 rows.
VisibleRuns RowsOf(const KvAttentionShape& shape, int64_t t, const KvSlotState& slot) {
  if (!shape.ring && shape.mask.kind == Kind::kStrided) {
    PS_DCHECK(*slot.count == t + 1);
    return shape.mask.StridedRuns(t);
  }
  VisibleRuns every;
  every.size = shape.ring ? std::min(*slot.count, shape.capacity) : *slot.count;
  return every;
}

struct DecodeItem {
  int64_t seq = 0;
  int64_t head = 0;   // first head
  int64_t heads = 1;  // heads head .. head + heads - 1 (all H on the fused path)
  int64_t r0 = 0;
  int64_t r1 = 0;
  int64_t partial = -1;  // index of the first head's partial record, -1: writes out directly
};

// --- prefill ---------------------------------------------------------------------------------

struct PrefillContext {
  const KvAttentionShape* shape = nullptr;
  int64_t start = 0;
  int64_t n = 0;
  const KvSlotState* slot = nullptr;
  int64_t old_rows = 0;   // cached keys before the chunk
  int64_t old_first = 0;  // ring: position of the oldest cached key
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
};

// Per-thread scratch of one prefill work item.
struct PrefillScratch {
  std::vector<float> acc;     // [kQueryTile, h]
  std::vector<float> scores;  // [kQueryTile, kKeyTile]
  std::vector<float> keys_t;  // [h, kKeyTile]: the key tile transposed, zero past nk
  std::vector<float> wide;    // [2, kKeyTile, h]: fp16 cached keys, then values, widened
  const uint16_t* half_ptr[2][kKeyTile];
  float m[kQueryTile];
  float l[kQueryTile];
  const float* key_ptr[kKeyTile];
  const float* value_ptr[kKeyTile];
  int64_t key_pos[kKeyTile];
  int64_t key_group[kKeyTile];
  bool key_always[kKeyTile];
};

// Folds one tile of nk keys (already in scratch.key_*) into the queries [i0, i0 + nq).
void PrefillKeyTile(const PrefillContext& ctx, int64_t head, int64_t i0, int64_t nq, int64_t nk,
                    PrefillScratch& s) {
  const KvAttentionShape& shape = *ctx.shape;
  const KeyMask& mask = shape.mask;
  const int64_t H = shape.heads;
  const int64_t h = shape.head_dim;
  bool any_always = false;
  for (int64_t j = 0; j < nk; ++j) {
    s.key_always[j] = Always(mask, s.key_pos[j]);
    s.key_group[j] = Group(mask, s.key_pos[j]);
    any_always |= s.key_always[j];
  }
  // A tile no query of the query tile sees (apart from keys every query sees) is skipped whole.
  const int64_t last_key = s.key_pos[nk - 1];
  if (!any_always && last_key <= i0 && TileHidden(mask, i0, i0 + nq - 1, s.key_pos[0], last_key)) {
    return;
  }

  // K^T of the tile, so that a query's scores are h broadcast FMAs over kKeyTile lanes (an
  // outer-product GEMM micro-kernel) instead of kKeyTile dot products with their reductions.
  float* keys_t = s.keys_t.data();
  for (int64_t j = 0; j < nk; ++j) {
    for (int64_t d = 0; d < h; ++d) keys_t[d * kKeyTile + j] = s.key_ptr[j][d];
  }
  for (int64_t j = nk; j < kKeyTile; ++j) {
    for (int64_t d = 0; d < h; ++d) keys_t[d * kKeyTile + j] = 0.0f;
  }

  const bool polynomial = shape.weighting == KvWeighting::kPolynomial;
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  static_assert(kKeyTile == 4 * kLanes && kQueryTile % 2 == 0);
  // Scores for the whole query tile, two queries at a time (an odd last one is paired with
  // itself; its twin row is scratch).
  for (int64_t a = 0; a < nq; a += 2) {
    const float* q0 = ctx.q + ((i0 + a - ctx.start) * H + head) * h;
    const float* q1 = a + 1 < nq ? q0 + H * h : q0;
    ScorePair(q0, q1, keys_t, h, s.scores.data() + a * kKeyTile,
              s.scores.data() + (a + 1) * kKeyTile);
  }
  // Weights: mask, then (x*x)*(x*x), or the online softmax (rescaling acc before the values).
  for (int64_t a = 0; a < nq; ++a) {
    const int64_t i = i0 + a;
    const int64_t query_group = Group(mask, i);
    float* row = s.scores.data() + a * kKeyTile;
    for (int64_t j = 0; j < nk; ++j) {
      const bool visible =
          s.key_pos[j] <= i && (s.key_always[j] || Near(mask, query_group, s.key_group[j]));
      const float x = row[j];
      row[j] = !visible     ? (polynomial ? 0.0f : kNegInf)
               : polynomial ? (x * x) * (x * x)
                            : x * scale;
    }
    if (polynomial) {
      s.l[a] += Sum(row, nk);
      continue;
    }
    std::fill(row + nk, row + kKeyTile, kNegInf);
    const float row_max = MaxOfTile(row);
    if (row_max == kNegInf) {  // nothing visible to this query in the tile
      std::fill(row, row + nk, 0.0f);
      continue;
    }
    if (row_max > s.m[a]) {
      const float c = std::exp(s.m[a] - row_max);  // 0 while m is -inf
      s.l[a] *= c;
      Scale(c, s.acc.data() + a * h, h);
      s.m[a] = row_max;
    }
    ExpShifted(row, nk, s.m[a]);
    s.l[a] += Sum(row, nk);
  }
  // acc += P V, two queries at a time.
  int64_t a = 0;
  for (; a + 2 <= nq; a += 2) {
    AccumulateRowsPair(s.scores.data() + a * kKeyTile, s.scores.data() + (a + 1) * kKeyTile,
                       s.value_ptr, nk, h, s.acc.data() + a * h, s.acc.data() + (a + 1) * h);
  }
  if (a < nq) {
    AccumulateRows(s.scores.data() + a * kKeyTile, s.value_ptr, nk, h, s.acc.data() + a * h);
  }
}

// Outputs of queries [i0, i0 + nq) for one head.
void PrefillQueryTile(const PrefillContext& ctx, int64_t head, int64_t i0, int64_t nq,
                      PrefillScratch& s) {
  const KvAttentionShape& shape = *ctx.shape;
  const KvSlotState& slot = *ctx.slot;
  const int64_t H = shape.heads;
  const int64_t h = shape.head_dim;
  const int64_t stride = H * h;
  std::fill(s.acc.begin(), s.acc.begin() + nq * h, 0.0f);
  std::fill(s.m, s.m + kQueryTile, kNegInf);
  std::fill(s.l, s.l + kQueryTile, 0.0f);

  // Cached keys, in position order.
  const bool half = IsHalf(shape);
  for (int64_t t0 = 0; t0 < ctx.old_rows; t0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, ctx.old_rows - t0);
    for (int64_t j = 0; j < nk; ++j) {
      int64_t row = t0 + j;
      if (shape.ring) {
        s.key_pos[j] = ctx.old_first + row;
        row = s.key_pos[j] % shape.capacity;
      } else {
        s.key_pos[j] = slot.positions[row];
      }
      if (half) {
        s.half_ptr[0][j] = slot.keys_f16 + row * stride + head * h;
        s.half_ptr[1][j] = slot.values_f16 + row * stride + head * h;
        s.key_ptr[j] = s.wide.data() + j * h;
        s.value_ptr[j] = s.wide.data() + (kKeyTile + j) * h;
      } else {
        s.key_ptr[j] = slot.keys + row * stride + head * h;
        s.value_ptr[j] = slot.values + row * stride + head * h;
      }
    }
    if (half) {
      HalfRowsToFloat(s.half_ptr[0], nk, h, s.wide.data());
      HalfRowsToFloat(s.half_ptr[1], nk, h, s.wide.data() + kKeyTile * h);
    }
    PrefillKeyTile(ctx, head, i0, nq, nk, s);
  }
  // The chunk's own keys up to the tile's last query.
  const int64_t last_query = i0 + nq - 1;
  for (int64_t j0 = ctx.start; j0 <= last_query; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, last_query - j0 + 1);
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t index = j0 + j - ctx.start;
      s.key_pos[j] = j0 + j;
      s.key_ptr[j] = ctx.k + index * stride + head * h;
      s.value_ptr[j] = ctx.v + index * stride + head * h;
    }
    PrefillKeyTile(ctx, head, i0, nq, nk, s);
  }

  for (int64_t a = 0; a < nq; ++a) {
    Partial part;
    part.l = s.l[a];
    Finish(shape, part, s.acc.data() + a * h, ctx.out + ((i0 + a - ctx.start) * H + head) * h);
  }
}

// The cache update of a prefill, after every output is computed.
void UpdateAfterPrefill(const KvAttentionShape& shape, int64_t start, int64_t n,
                        const KvSlotState& slot, const float* k, const float* v) {
  const int64_t row = shape.heads * shape.head_dim;
  const size_t row_bytes = RowBytes(shape);
  std::byte* keys = KeyBytes(shape, slot);
  std::byte* values = ValueBytes(shape, slot);
  const int64_t last = start + n - 1;
  if (shape.ring) {
    const int64_t w = shape.capacity;
    for (int64_t p = std::max(start, last - w + 1); p <= last; ++p) {
      StoreRow(shape, k + (p - start) * row, keys + (p % w) * row_bytes);
      StoreRow(shape, v + (p - start) * row, values + (p % w) * row_bytes);
    }
    *slot.count += n;
    return;
  }
  DropUnkept(shape, last, slot);
  int64_t count = *slot.count;
  for (int64_t p = start; p <= last; ++p) {
    if (!shape.mask.Kept(last, p)) continue;
    PS_DCHECK(count < shape.capacity);
    StoreRow(shape, k + (p - start) * row, keys + count * row_bytes);
    StoreRow(shape, v + (p - start) * row, values + count * row_bytes);
    slot.positions[count++] = p;
  }
  *slot.count = count;
}

}  // namespace

absl::string_view KvDecodePathName(KvDecodePath path) {
  return path == KvDecodePath::kAvx512 ? "avx512" : "portable";
}

std::vector<KvDecodePath> SupportedKvDecodePaths() {
  std::vector<KvDecodePath> paths = {KvDecodePath::kPortable};
#if PS_KV_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) paths.push_back(KvDecodePath::kAvx512);
#endif
  return paths;
}

KvDecodePath BestKvDecodePath() {
  static const KvDecodePath best = SupportedKvDecodePaths().back();
  return best;
}

void KvDecode(ThreadPool& pool, const KvAttentionShape& shape, absl::Span<const int64_t> positions,
              absl::Span<const KvSlotState> slots, const float* q, const float* k, const float* v,
              float* out, KvDecodePath path) {
  PS_DCHECK(positions.size() == slots.size());
  const bool fused = FusedCovers(path, shape);
  const int64_t B = static_cast<int64_t>(positions.size());
  if (B == 0) return;
  const int64_t H = shape.heads;
  const int64_t h = shape.head_dim;
  const int64_t stride = H * h;
  const bool half = IsHalf(shape);

  pool.ParallelFor(B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      AppendDecode(shape, positions[b], slots[b], k + b * stride, v + b * stride);
    }
  });

  // Work items. Portable loops: each (sequence, head), split into key ranges when B * H alone
  // would leave threads idle and the cache is long enough to be worth it. Fused loops: each
  // sequence with all its heads (they walk the cache row-major), split into key ranges when B
  // alone would leave threads idle.
  const int64_t threads = pool.num_threads();
  const int64_t units = fused ? B : B * H;
  const int64_t wanted = threads == 1 ? 1 : (4 * threads + units - 1) / units;
  const int64_t item_heads = fused ? H : 1;
  thread_local std::vector<DecodeItem> items;
  thread_local std::vector<float> partials;  // per split and head: [m, l, acc h]
  items.clear();
  int64_t num_partials = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t rows = RowsOf(shape, positions[b], slots[b]).size;
    const int64_t splits =
        std::max<int64_t>(1, std::min(wanted, (rows + kMinSplitKeys - 1) / kMinSplitKeys));
    const int64_t per_split = (rows + splits - 1) / splits;
    for (int64_t head = 0; head < H; head += item_heads) {
      for (int64_t s = 0; s < splits; ++s) {
        DecodeItem item;
        item.seq = b;
        item.head = head;
        item.heads = item_heads;
        item.r0 = s * per_split;
        item.r1 = std::min(rows, (s + 1) * per_split);
        if (splits > 1) {
          item.partial = num_partials;
          num_partials += item_heads;
        }
        items.push_back(item);
      }
    }
  }
  const int64_t record = h + 2;
  if (num_partials > 0) partials.resize(static_cast<size_t>(num_partials * record));
  const DecodeItem* item_data = items.data();
  float* partial_data = partials.data();

  pool.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> acc;    // [heads of an item, h]
    thread_local std::vector<float> tile;   // portable path, fp16 caches: [2, kDecodeTile, h]
    thread_local std::vector<float> spill;  // fused path: [H, 2, h]
    thread_local std::vector<Partial> parts;
    acc.resize(static_cast<size_t>(item_heads * h));
    parts.resize(static_cast<size_t>(item_heads));
    if (half && !fused) tile.resize(static_cast<size_t>(2 * kDecodeTile * h));
    if (fused) spill.resize(static_cast<size_t>(2 * H * h));
    for (int64_t i = i0; i < i1; ++i) {
      const DecodeItem& item = item_data[i];
      const KvSlotState& slot = slots[item.seq];
      const int64_t offset = item.seq * stride + item.head * h;
      const void* keys = half ? static_cast<const void*>(slot.keys_f16 + item.head * h)
                              : static_cast<const void*>(slot.keys + item.head * h);
      const void* values = half ? static_cast<const void*>(slot.values_f16 + item.head * h)
                                : static_cast<const void*>(slot.values + item.head * h);
      const VisibleRuns rows = RowsOf(shape, positions[item.seq], slot);
#if PS_KV_X86
      if (fused) {
        AttendFused(shape, q + offset, keys, values, stride, rows, item.r0, item.r1, parts.data(),
                    acc.data(), spill.data());
      } else {
        parts[0] = AttendRange(shape, q + offset, keys, values, stride, rows, item.r0, item.r1,
                               acc.data(), tile.data());
      }
#else
      parts[0] = AttendRange(shape, q + offset, keys, values, stride, rows, item.r0, item.r1,
                             acc.data(), tile.data());
#endif
      for (int64_t hd = 0; hd < item.heads; ++hd) {
        const float* head_acc = acc.data() + hd * h;
        if (item.partial < 0) {
          Finish(shape, parts[hd], head_acc, out + offset + hd * h);
          continue;
        }
        float* rec = partial_data + (item.partial + hd) * record;
        rec[0] = parts[hd].m;
        rec[1] = parts[hd].l;
        std::copy(head_acc, head_acc + h, rec + 2);
      }
    }
  });
  if (num_partials == 0) return;

  // Merge the splits of each (sequence, head) in double: the splits of one (sequence, first
  // head) are consecutive items, and head hd of item s has record s.partial + hd.
  const bool polynomial = shape.weighting == KvWeighting::kPolynomial;
  std::vector<double> sum(static_cast<size_t>(h));
  for (size_t i = 0; i < items.size();) {
    size_t end = i + 1;
    while (end < items.size() && items[end].seq == items[i].seq &&
           items[end].head == items[i].head) {
      ++end;
    }
    if (items[i].partial < 0) {
      i = end;
      continue;
    }
    for (int64_t hd = 0; hd < items[i].heads; ++hd) {
      float max = kNegInf;
      for (size_t s = i; s < end; ++s) {
        max = std::max(max, partials[(items[s].partial + hd) * record]);
      }
      std::fill(sum.begin(), sum.end(), 0.0);
      double denominator = polynomial ? 1.0 : 0.0;
      for (size_t s = i; s < end; ++s) {
        const float* rec = partials.data() + (items[s].partial + hd) * record;
        const double c = polynomial || rec[1] == 0.0f ? 1.0 : std::exp(double{rec[0]} - max);
        denominator += c * rec[1];
        for (int64_t d = 0; d < h; ++d) sum[d] += c * rec[2 + d];
      }
      float* o = out + items[i].seq * stride + (items[i].head + hd) * h;
      for (int64_t d = 0; d < h; ++d) o[d] = static_cast<float>(sum[d] / denominator);
    }
    i = end;
  }
}

void KvPrefill(ThreadPool& pool, const KvAttentionShape& shape, int64_t start, int64_t n,
               const KvSlotState& slot, const float* q, const float* k, const float* v,
               float* out) {
  if (n <= 0) return;
  PrefillContext ctx;
  ctx.shape = &shape;
  ctx.start = start;
  ctx.n = n;
  ctx.slot = &slot;
  if (shape.ring) {
    PS_DCHECK(*slot.count == start);
    ctx.old_rows = std::min(*slot.count, shape.capacity);
    ctx.old_first = *slot.count - ctx.old_rows;
  } else {
    ctx.old_rows = *slot.count;
  }
  ctx.q = q;
  ctx.k = k;
  ctx.v = v;
  ctx.out = out;

  const int64_t H = shape.heads;
  const int64_t h = shape.head_dim;
  if (IsHalf(shape)) {
    // The chunk's keys and values as the cache will hold them, so that query i sees exactly
    // what a decode step at i would (its own key included).
    thread_local std::vector<float> rounded;  // [2, n, H, h]: k, then v
    thread_local std::vector<uint16_t> bits;  // [n, H, h]
    const int64_t size = n * H * h;
    rounded.resize(static_cast<size_t>(2 * size));
    bits.resize(static_cast<size_t>(size));
    FloatToHalf(k, size, bits.data());
    HalfToFloat(bits.data(), size, rounded.data());
    FloatToHalf(v, size, bits.data());
    HalfToFloat(bits.data(), size, rounded.data() + size);
    ctx.k = rounded.data();
    ctx.v = rounded.data() + size;
  }
  const int64_t num_tiles = (n + kQueryTile - 1) / kQueryTile;
  // The last query tiles see the most keys: hand them out first so the tail balances.
  pool.ParallelFor(H * num_tiles, 1, [&](int64_t i0, int64_t i1) {
    thread_local PrefillScratch scratch;
    scratch.acc.resize(static_cast<size_t>(kQueryTile * h));
    scratch.scores.resize(static_cast<size_t>(kQueryTile * kKeyTile));
    scratch.keys_t.resize(static_cast<size_t>(h * kKeyTile));
    if (IsHalf(shape)) scratch.wide.resize(static_cast<size_t>(2 * kKeyTile * h));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t tile = num_tiles - 1 - item / H;
      const int64_t head = item % H;
      const int64_t first = start + tile * kQueryTile;
      PrefillQueryTile(ctx, head, first, std::min(kQueryTile, start + n - first), scratch);
    }
  });
  UpdateAfterPrefill(shape, start, n, slot, ctx.k, ctx.v);
}

}  // namespace ps::kernels::cpu
