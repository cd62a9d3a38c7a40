// The local_exact decode step as it was before issue 19 item 3 (main at 132ff78): the slot kept a
// second full state S_cur [H, P, h+1], read-modify-written every step and added into S at a block
// start. Benchmark-only: bench/cpu_sketch_bench.cc runs it beside the current kernel
// (kernels/cpu/sketch_attention.h) in the same process, so the before/after figures of
// docs/performance.md come from one run on the same machine state. Not used by the engine and
// not tested beyond that benchmark; do not use it elsewhere.
//
// Bytes per (sequence, head) and step: 3 P (h+1) 4 (read S, read and write S_cur) plus the buffer
// rows read; 4 P (h+1) 4 at a block start.
#include "bench/legacy_sketch_decode.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "base/check.h"
#include "kernels/packed_index.h"

namespace ps::bench::legacy {

using ::ps::kernels::SketchAttentionShape;
namespace {

using ::ps::kernels::PackedSymmetricIndex;
using ::ps::kernels::PackedSymmetricRows;

constexpr int64_t kMinDecodeChunkRows = 64;  // smallest share of a head's rows given to a thread

// (a, c) of packed row p (PackedSymmetricIndex's inverse); O(r), called once per work item.
void PairOf(int64_t p, int64_t r, int64_t& a, int64_t& c) {
  a = 0;
  while (a + 1 < r && PackedSymmetricIndex(a + 1, a + 1, r) <= p) ++a;
  c = a + (p - PackedSymmetricIndex(a, a, r));
}

// The pair of the next packed row.
inline void NextPair(int64_t r, int64_t& a, int64_t& c) {
  if (++c == r) {
    ++a;
    c = a;
  }
}

// sum_i x[i] y[i] with independent partial sums, so that it vectorises without -ffast-math.
inline float Dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[i + l] * y[i + l];
  }
  float sum = 0.0f;
  for (; i < n; ++i) sum += x[i] * y[i];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

inline float Pow4(float x) {
  const float x2 = x * x;
  return x2 * x2;
}

enum class DecodeMode {
  kPlain,      // S += wk [v; 1];            u += wq S
  kLocal,      // S_cur += wk [v; 1];        u += wq S
  kLocalFold,  // S += S_cur; S_cur = wk [v; 1]; u += wq S   (first token of a block)
};

struct DecodeHead {
  int64_t r = 0;
  int64_t cols = 0;
  const float* psi_q = nullptr;  // [r]
  const float* psi_k = nullptr;  // [r]
  const float* vv = nullptr;     // [cols]: [v; 1]
  float* s = nullptr;            // [P, cols]
  float* s_cur = nullptr;        // [P, cols] (local_exact) or == s
};

// Rows [p0, p1) of one head, update and readout in one pass, any width: u [cols] = the readout
// of the updated rows.
template <DecodeMode kMode>
void DecodeRows(const DecodeHead& hd, int64_t p0, int64_t p1, float* __restrict acc) {
  const int64_t cols = hd.cols;
  std::fill(acc, acc + cols, 0.0f);
  const float* __restrict pq = hd.psi_q;
  const float* __restrict pk = hd.psi_k;
  const float* __restrict vv = hd.vv;
  int64_t a, c;
  PairOf(p0, hd.r, a, c);
  for (int64_t p = p0; p < p1; ++p) {
    const float wk = pk[a] * pk[c];
    // Off-diagonal rows stand for both (a, c) and (c, a).
    const float wq = (a == c ? 1.0f : 2.0f) * pq[a] * pq[c];
    float* __restrict srow = hd.s + p * cols;
    if constexpr (kMode == DecodeMode::kPlain) {
      for (int64_t j = 0; j < cols; ++j) {
        const float x = srow[j] + wk * vv[j];
        srow[j] = x;
        acc[j] += wq * x;
      }
    } else if constexpr (kMode == DecodeMode::kLocal) {
      float* __restrict crow = hd.s_cur + p * cols;
      for (int64_t j = 0; j < cols; ++j) {
        crow[j] += wk * vv[j];
        acc[j] += wq * srow[j];
      }
    } else {
      float* __restrict crow = hd.s_cur + p * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const float x = srow[j] + crow[j];
        srow[j] = x;
        crow[j] = wk * vv[j];
        acc[j] += wq * x;
      }
    }
    NextPair(hd.r, a, c);
  }
}

// The same for cols = 16 kVecs + 1 (h a multiple of 16) with explicit 16-float vectors (GCC
// vector extensions: one zmm register with AVX-512, two or four narrower ones without), so the
// readout sums and [v; 1] stay in registers for the whole pass; loads and stores are unaligned
// (a row is 4 (h+1) bytes). No vector crosses a function boundary (keeps the ABI out of it).
template <int kVecs, DecodeMode kMode>
void DecodeRowsVec(const DecodeHead& hd, int64_t p0, int64_t p1, float* __restrict u) {
  typedef float V16 __attribute__((vector_size(64)));
  constexpr int64_t kCols = 16 * kVecs + 1;
  constexpr int64_t kH = kCols - 1;  // the normaliser column
  constexpr size_t kBytes = sizeof(V16);
  V16 acc[kVecs];
  V16 vv[kVecs];
  for (int q = 0; q < kVecs; ++q) {
    acc[q] = V16{};
    std::memcpy(&vv[q], hd.vv + 16 * q, kBytes);
  }
  float acc_n = 0.0f;
  const float* __restrict pq = hd.psi_q;
  const float* __restrict pk = hd.psi_k;
  int64_t a, c;
  PairOf(p0, hd.r, a, c);
  for (int64_t p = p0; p < p1; ++p) {
    const float wk = pk[a] * pk[c];
    // Off-diagonal rows stand for both (a, c) and (c, a).
    const float wq = (a == c ? 1.0f : 2.0f) * pq[a] * pq[c];
    float* srow = hd.s + p * kCols;
    float* crow = hd.s_cur + p * kCols;
#pragma GCC unroll 16
    for (int q = 0; q < kVecs; ++q) {
      V16 x;
      std::memcpy(&x, srow + 16 * q, kBytes);
      if constexpr (kMode == DecodeMode::kPlain) {
        x += wk * vv[q];
        std::memcpy(srow + 16 * q, &x, kBytes);
      } else if constexpr (kMode == DecodeMode::kLocal) {
        V16 y;
        std::memcpy(&y, crow + 16 * q, kBytes);
        y += wk * vv[q];
        std::memcpy(crow + 16 * q, &y, kBytes);
      } else {
        V16 y;
        std::memcpy(&y, crow + 16 * q, kBytes);
        x += y;
        std::memcpy(srow + 16 * q, &x, kBytes);
        y = wk * vv[q];
        std::memcpy(crow + 16 * q, &y, kBytes);
      }
      acc[q] += wq * x;
    }
    float xn = srow[kH];
    if constexpr (kMode == DecodeMode::kPlain) {
      xn += wk;
      srow[kH] = xn;
    } else if constexpr (kMode == DecodeMode::kLocal) {
      crow[kH] += wk;
    } else {
      xn += crow[kH];
      srow[kH] = xn;
      crow[kH] = wk;
    }
    acc_n += wq * xn;
    NextPair(hd.r, a, c);
  }
  for (int q = 0; q < kVecs; ++q) std::memcpy(u + 16 * q, &acc[q], kBytes);
  u[kH] = acc_n;
}

template <DecodeMode kMode>
void DecodeRowsForWidth(const DecodeHead& hd, int64_t p0, int64_t p1, float* u) {
  switch (hd.cols) {
    case 33:
      return DecodeRowsVec<2, kMode>(hd, p0, p1, u);
    case 65:
      return DecodeRowsVec<4, kMode>(hd, p0, p1, u);
    case 129:
      return DecodeRowsVec<8, kMode>(hd, p0, p1, u);
    default:
      return DecodeRows<kMode>(hd, p0, p1, u);
  }
}

void DecodeRowsDispatch(DecodeMode mode, const DecodeHead& hd, int64_t p0, int64_t p1, float* u) {
  switch (mode) {
    case DecodeMode::kPlain:
      return DecodeRowsForWidth<DecodeMode::kPlain>(hd, p0, p1, u);
    case DecodeMode::kLocal:
      return DecodeRowsForWidth<DecodeMode::kLocal>(hd, p0, p1, u);
    case DecodeMode::kLocalFold:
      return DecodeRowsForWidth<DecodeMode::kLocalFold>(hd, p0, p1, u);
  }
}

}  // namespace

void SketchDecode(kernels::cpu::ThreadPool& pool, const kernels::SketchAttentionShape& shape,
                  absl::Span<const int64_t> positions, absl::Span<const SlotState> slots,
                  const float* psi_q, const float* psi_k, const float* v, const float* q_local,
                  const float* k_local, float* out) {
  const int64_t B = static_cast<int64_t>(positions.size());
  const int64_t H = shape.heads;
  const int64_t h = shape.head_dim;
  const int64_t r = shape.sketch_size;
  const int64_t b = shape.block_size;
  const int64_t P = PackedSymmetricRows(r);
  const int64_t cols = h + 1;
  const bool local = shape.local_exact;
  const int64_t num_pairs = B * H;
  PS_DCHECK(slots.size() == positions.size());
  PS_DCHECK(!local || (b > 0 && q_local != nullptr && k_local != nullptr));
  if (num_pairs == 0) return;

  // Split a head's rows when there are too few (sequence, head) pairs to keep every thread busy
  // (batch 1: a few heads on more threads); a share stays large enough to stream efficiently.
  const int64_t threads = pool.num_threads();
  int64_t chunks = 1;
  if (num_pairs < 2 * threads) {
    chunks = std::clamp<int64_t>((2 * threads + num_pairs - 1) / num_pairs, 1,
                                 std::max<int64_t>(1, P / kMinDecodeChunkRows));
  }

  // [v; 1] per pair, then one partial readout per (pair, chunk).
  std::vector<float> scratch((num_pairs + num_pairs * chunks) * cols);
  float* vv = scratch.data();
  float* partial = vv + num_pairs * cols;
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    std::copy(v + pair * h, v + (pair + 1) * h, vv + pair * cols);
    vv[pair * cols + h] = 1.0f;
  }

  // The local part and the output of one pair, from its summed readout u [cols].
  auto finish = [&](int64_t pair, float* __restrict u) {
    const int64_t i = pair / H;
    const int64_t head = pair % H;
    if (local) {
      const int64_t t = positions[i];
      const int64_t m = t % b;  // rows of this block before this token
      float* keys = slots[i].local_keys + head * b * h;
      float* values = slots[i].local_values + head * b * h;
      std::copy(k_local + pair * h, k_local + (pair + 1) * h, keys + m * h);
      std::copy(v + pair * h, v + (pair + 1) * h, values + m * h);
      const float* q = q_local + pair * h;
      for (int64_t j = 0; j <= m; ++j) {
        const float w = Pow4(Dot(q, keys + j * h, h));
        const float* __restrict vj = values + j * h;
        for (int64_t d = 0; d < h; ++d) u[d] += w * vj[d];
        u[h] += w;
      }
    }
    // The "1 +" is part of the trained function, not an epsilon (algorithm.md section 2).
    const float inv = 1.0f / (1.0f + u[h]);
    for (int64_t d = 0; d < h; ++d) out[pair * h + d] = u[d] * inv;
  };

  pool.ParallelFor(num_pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / chunks;
      const int64_t chunk = item % chunks;
      const int64_t i = pair / H;
      const int64_t head = pair % H;
      const int64_t t = positions[i];
      DecodeHead hd;
      hd.r = r;
      hd.cols = cols;
      hd.psi_q = psi_q + pair * r;
      hd.psi_k = psi_k + pair * r;
      hd.vv = vv + pair * cols;
      hd.s = slots[i].sketch + head * P * cols;
      hd.s_cur = local ? slots[i].sketch_cur + head * P * cols : hd.s;
      const DecodeMode mode = !local                  ? DecodeMode::kPlain
                              : (t % b == 0 && t > 0) ? DecodeMode::kLocalFold
                                                      : DecodeMode::kLocal;
      float* u = partial + item * cols;
      DecodeRowsDispatch(mode, hd, P * chunk / chunks, P * (chunk + 1) / chunks, u);
      if (chunks == 1) finish(pair, u);
    }
  });
  if (chunks == 1) return;
  pool.ParallelFor(num_pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      float* u = partial + pair * chunks * cols;
      for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        const float* __restrict part = u + chunk * cols;
        for (int64_t j = 0; j < cols; ++j) u[j] += part[j];
      }
      finish(pair, u);
    }
  });
}

}  // namespace ps::bench::legacy
