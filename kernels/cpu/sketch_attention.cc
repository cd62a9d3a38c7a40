// Polysketch decode and prefill on the CPU (algorithm.md sections 3 and 4; contract in
// kernels/backend.h). All arithmetic is fp32 (section 5); the oracle is reference::SketchUpdate /
// SketchReadout and server/engine/model/reference_model.cc AttendSketch.
//
// Decode (memory-bound): one pass over the rows [p0, p1) of a head's packed state fuses the update
// and the readout, so S is read once and written once (plain), or only read (local_exact: the
// current block is not in S but in the local buffer, psi(k) [b, r] beside k~ and v [b, h]).
// local_exact folds the completed block into S lazily, kDecodeFoldKeys of its rows per step over
// the first steps of the next block, so that no step carries the whole [P, b] x [b, h+1] GEMM (at
// b 256 that step cost 7-19 ordinary ones): the block's rows stay in the buffer's top rows, which
// the new block reaches only after they are folded, and *local_pending counts them. A folding step
// runs the same fused pass, folding its rows into S 32 state rows at a time so that they are still
// in L1 when the readout reads them (FoldBlock, the prefill's fold); the query reads the rows still
// pending exactly, (psi_q . psi_k)^2 [v; 1], so the result is the eager fold's up to rounding. A
// row is h+1 = 65 contiguous floats for h = 64; for h = 32, 64, 128 the column loop is compiled for
// that width with 16-float vectors so the readout sums and [v; 1] stay in registers. Bytes per
// (sequence, head) and step: 2 P (h+1) 4 (plain); P (h+1) 4 + (m+1) 2 h 4 + r 4 (local_exact, m
// buffer rows before the token), and in the first b / kDecodeFoldKeys steps of a block P (h+1) 4
// more (S written) plus the pending rows, (r + h) 4 each, and 2 P (h+1) kDecodeFoldKeys flops.
//
// Prefill (compute-bound): per tile up to four parallel phases: the local_exact block-start fold
// (the buffer into S, per (head, state rows)), prepare (transposes, the local buffer), readout +
// intra-tile part per (head, query rows), and (plain) the fold of the tile per (head, state rows).
// The readout is [tile, P] x [P, h+1] with the left operand formed on the fly from psi_q (4 query
// rows share each state row load); the fold is [P, tile] x [tile, h+1] (4 state rows share each
// [v; 1] load). local_exact folds each block once, from the buffer, at the block start (and first
// any rows a decode left pending), with the FoldBlock code decode uses.
#include "kernels/cpu/sketch_attention.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "base/check.h"
#include "kernels/packed_index.h"

namespace ps::kernels::cpu {
namespace {

constexpr int64_t kDefaultPlainTile = 256;   // prefill tile without local_exact when b == 0
constexpr int64_t kMinDecodeChunkRows = 64;  // smallest share of a head's rows given to a thread
constexpr int64_t kPrefillQueryRows = 16;    // query rows per prefill work item
constexpr int64_t kPrefillFoldRows = 32;     // state rows per prefill fold work item
constexpr int64_t kDecodeFoldRows = 32;      // state rows folded then read out together in decode
// Keys of the previous block a local_exact decode step folds (the lazy fold): a block is folded
// over its successor's first b / kDecodeFoldKeys steps. 8 keys make the fold 8 FMAs per state
// element read and written, so a folding step costs about two ordinary ones (a state row is read
// anyway), and the rows still pending stay few for most of the block.
constexpr int64_t kDecodeFoldKeys = 8;
constexpr int kBlock = 4;  // rows sharing one load in the prefill GEMMs

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

// Columns of the intra-tile weight rows computed per register block.
constexpr int64_t kWeightChunk = 64;

// w[j] = sum_x q[x] m[x, j] for j < nk rounded up to kWeightChunk (the extra entries are
// garbage for the caller to mask). m [depth, stride] with stride a multiple of kWeightChunk.
inline void RowTimesMatrix(const float* __restrict q, int64_t depth, const float* __restrict m,
                           int64_t stride, int64_t nk, float* __restrict w) {
  for (int64_t j0 = 0; j0 < nk; j0 += kWeightChunk) {
    float acc[kWeightChunk] = {};
    for (int64_t x = 0; x < depth; ++x) {
      const float qx = q[x];
      const float* __restrict mx = m + x * stride + j0;
      for (int64_t l = 0; l < kWeightChunk; ++l) acc[l] += qx * mx[l];
    }
    std::copy(acc, acc + kWeightChunk, w + j0);
  }
}

// --- decode --------------------------------------------------------------------------------------

enum class DecodeMode {
  kPlain,  // S += wk [v; 1];  u += wq S
  kLocal,  // u += wq S (S_prev: the token waits in the local buffer until its block is folded)
};

struct DecodeHead {
  int64_t r = 0;
  int64_t cols = 0;
  const float* psi_q = nullptr;  // [r]
  const float* psi_k = nullptr;  // [r]
  const float* vv = nullptr;     // [cols]: [v; 1]
  float* s = nullptr;            // [P, cols]
};

// Rows [p0, p1) of one head, update (plain) and readout in one pass, any width: u [cols] = the
// readout of the (updated) rows.
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
    [[maybe_unused]] const float wk = kMode == DecodeMode::kPlain ? pk[a] * pk[c] : 0.0f;
    // Off-diagonal rows stand for both (a, c) and (c, a).
    const float wq = (a == c ? 1.0f : 2.0f) * pq[a] * pq[c];
    float* __restrict srow = hd.s + p * cols;
    if constexpr (kMode == DecodeMode::kPlain) {
      for (int64_t j = 0; j < cols; ++j) {
        const float x = srow[j] + wk * vv[j];
        srow[j] = x;
        acc[j] += wq * x;
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) acc[j] += wq * srow[j];
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
    [[maybe_unused]] const float wk = kMode == DecodeMode::kPlain ? pk[a] * pk[c] : 0.0f;
    // Off-diagonal rows stand for both (a, c) and (c, a).
    const float wq = (a == c ? 1.0f : 2.0f) * pq[a] * pq[c];
    float* srow = hd.s + p * kCols;
#pragma GCC unroll 16
    for (int q = 0; q < kVecs; ++q) {
      V16 x;
      std::memcpy(&x, srow + 16 * q, kBytes);
      if constexpr (kMode == DecodeMode::kPlain) {
        x += wk * vv[q];
        std::memcpy(srow + 16 * q, &x, kBytes);
      }
      acc[q] += wq * x;
    }
    float xn = srow[kH];
    if constexpr (kMode == DecodeMode::kPlain) {
      xn += wk;
      srow[kH] = xn;
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

// --- prefill -------------------------------------------------------------------------------------

// The geometry of one prefill tile and the per-head scratch it uses.
struct Tile {
  int64_t s = 0;      // first position
  int64_t t = 0;      // tokens
  int64_t row0 = 0;   // row of position s in the call's buffers
  int64_t koff = 0;   // keys before the tile that its queries attend to exactly (local buffer)
  int64_t keys = 0;   // koff + t
  bool fold = false;  // local_exact: fold the buffer into S first (s is a block start > 0)
};

struct PrefillScratch {
  int64_t tile_max = 0;
  std::vector<float> bt;  // [H, r, stride]: psi_k of the tile, transposed (plain)
  std::vector<float> kt;  // [H, h, stride]: k~ of the block so far, transposed (local_exact)
  std::vector<float> c;   // [H, tile_max, cols]: [v; 1] of the keys (block so far, or the tile)
};

// u [kR, cols] = phi(A rows) S over all P rows: each state row is loaded once for kR queries.
template <int kCols, int kR>
void ReadoutBlock(int64_t r, int64_t num_rows, int64_t cols_rt, const float* __restrict s,
                  const float* const* a_rows, float* __restrict u) {
  const int64_t cols = kCols > 0 ? kCols : cols_rt;
  float local_acc[kCols > 0 ? kR * kCols : 1];
  float* __restrict acc = kCols > 0 ? local_acc : u;
  std::fill(acc, acc + kR * cols, 0.0f);
  int64_t a = 0, c = 0;
  for (int64_t p = 0; p < num_rows; ++p) {
    const float f = a == c ? 1.0f : 2.0f;
    float w[kR];
    for (int k = 0; k < kR; ++k) w[k] = f * a_rows[k][a] * a_rows[k][c];
    const float* __restrict srow = s + p * cols;
    for (int k = 0; k < kR; ++k) {
      for (int64_t j = 0; j < cols; ++j) acc[k * cols + j] += w[k] * srow[j];
    }
    NextPair(r, a, c);
  }
  if constexpr (kCols > 0) std::copy(acc, acc + kR * cols, u);
}

template <int kR>
void ReadoutBlockForWidth(int64_t r, int64_t num_rows, int64_t cols, const float* s,
                          const float* const* a_rows, float* u) {
  switch (cols) {
    case 33:
      return ReadoutBlock<33, kR>(r, num_rows, cols, s, a_rows, u);
    case 65:
      return ReadoutBlock<65, kR>(r, num_rows, cols, s, a_rows, u);
    default:
      return ReadoutBlock<0, kR>(r, num_rows, cols, s, a_rows, u);
  }
}

// The t keys of a fold: psi(k_j)[a] = keys[j * key_row + a * key_col], value column d < h of
// token j = values[j * value_row + d], and the normaliser column is 1. The prefill's plain tiles
// pass psi_k transposed ([r, stride]: key_row 1) and [v; 1] rows; the local_exact fold passes the
// slot's buffer as it is (psi(k) [b, r], v [b, h]).
struct FoldOperands {
  const float* keys = nullptr;
  int64_t key_row = 0;
  int64_t key_col = 0;
  const float* values = nullptr;
  int64_t value_row = 0;
};

// target[p0 + k] += sum_{j < t} B[j,a_k] B[j,c_k] [v_j; 1] for kR rows starting at p0 (the pairs
// (a_k, c_k) of rows p0 .. p0+kR-1): each v_j is loaded once for kR state rows. Each row's sum
// runs over j in order whatever kR is, so the result of a row does not depend on the blocking.
template <int kCols, int kR>
void FoldBlock(int64_t r, int64_t p0, int64_t t, const FoldOperands& op, int64_t cols_rt,
               float* __restrict target) {
  const int64_t cols = kCols > 0 ? kCols : cols_rt;
  const int64_t h = cols - 1;
  const float* brow_a[kR];
  const float* brow_c[kR];
  int64_t a, c;
  PairOf(p0, r, a, c);
  for (int k = 0; k < kR; ++k) {
    brow_a[k] = op.keys + a * op.key_col;
    brow_c[k] = op.keys + c * op.key_col;
    NextPair(r, a, c);
  }
  if constexpr (kCols > 0) {
    float acc[kR * kCols] = {};
    for (int64_t j = 0; j < t; ++j) {
      const float* __restrict vj = op.values + j * op.value_row;
      const int64_t kj = j * op.key_row;
      for (int k = 0; k < kR; ++k) {
        const float w = brow_a[k][kj] * brow_c[k][kj];
        for (int64_t i = 0; i < kCols - 1; ++i) acc[k * kCols + i] += w * vj[i];
        acc[k * kCols + kCols - 1] += w;
      }
    }
    for (int k = 0; k < kR; ++k) {
      float* __restrict row = target + (p0 + k) * kCols;
      for (int64_t i = 0; i < kCols; ++i) row[i] += acc[k * kCols + i];
    }
  } else {
    // Accumulate straight into the state rows (still in L1 across j).
    for (int64_t j = 0; j < t; ++j) {
      const float* __restrict vj = op.values + j * op.value_row;
      const int64_t kj = j * op.key_row;
      for (int k = 0; k < kR; ++k) {
        const float w = brow_a[k][kj] * brow_c[k][kj];
        float* __restrict row = target + (p0 + k) * cols;
        for (int64_t i = 0; i < h; ++i) row[i] += w * vj[i];
        row[h] += w;
      }
    }
  }
}

template <int kR>
void FoldBlockForWidth(int64_t r, int64_t p0, int64_t t, const FoldOperands& op, int64_t cols,
                       float* target) {
  switch (cols) {
    case 33:
      return FoldBlock<33, kR>(r, p0, t, op, cols, target);
    case 65:
      return FoldBlock<65, kR>(r, p0, t, op, cols, target);
    default:
      return FoldBlock<0, kR>(r, p0, t, op, cols, target);
  }
}

// Rows [p0, p1) of one head's state += the fold of t keys, kBlock rows sharing each value load.
void FoldRows(int64_t r, int64_t p0, int64_t p1, int64_t t, const FoldOperands& op, int64_t cols,
              float* target) {
  int64_t p = p0;
  for (; p + kBlock <= p1; p += kBlock) FoldBlockForWidth<kBlock>(r, p, t, op, cols, target);
  for (; p < p1; ++p) FoldBlockForWidth<1>(r, p, t, op, cols, target);
}

// The local_exact fold of buffer rows from `first_row` on (of one head's slot buffer of b rows).
FoldOperands BufferFold(const SketchSlotState& slot, int64_t head, int64_t b, int64_t h, int64_t r,
                        int64_t first_row) {
  FoldOperands op;
  op.keys = slot.local_sketch + (head * b + first_row) * r;
  op.key_row = r;
  op.key_col = 1;
  op.values = slot.local_values + (head * b + first_row) * h;
  op.value_row = h;
  return op;
}

// The lazy fold of one local_exact decode step: rows of the previous block pending before and
// after it. The step folds buffer rows [b - before, b - after) and reads [b - after, b) exactly.
struct FoldPlan {
  int64_t before = 0;
  int64_t after = 0;
};

FoldPlan PlanFold(int64_t t, int64_t b, int64_t pending) {
  const int64_t m = t % b;
  FoldPlan plan;
  // A block start makes the whole buffer pending; a valid slot has none left by then.
  PS_DCHECK(m != 0 || pending == 0);
  plan.before = m == 0 && t > 0 ? b : pending;
  // kDecodeFoldKeys per step, and always enough that row m (this token's) is no longer pending.
  plan.after = std::min(std::max<int64_t>(0, plan.before - kDecodeFoldKeys), b - m - 1);
  return plan;
}

// u[k] += sum_{j < nk} w[k, j] [v_j; 1] for kR query rows: each [v_j; 1] is loaded once for kR
// queries (the intra-tile product W C). w [kR, w_stride] (zero past each row's causal end), cv
// [nk, cols], u [kR, cols].
template <int kCols, int kR>
void WeightedSumBlock(int64_t nk, int64_t w_stride, int64_t cols_rt, const float* __restrict w,
                      const float* __restrict cv, float* __restrict u) {
  const int64_t cols = kCols > 0 ? kCols : cols_rt;
  if constexpr (kCols > 0) {
    float acc[kR * kCols] = {};
    for (int64_t j = 0; j < nk; ++j) {
      const float* __restrict cj = cv + j * kCols;
      for (int k = 0; k < kR; ++k) {
        const float wk = w[k * w_stride + j];
        for (int64_t i = 0; i < kCols; ++i) acc[k * kCols + i] += wk * cj[i];
      }
    }
    for (int64_t i = 0; i < kR * kCols; ++i) u[i] += acc[i];
  } else {
    for (int64_t j = 0; j < nk; ++j) {
      const float* __restrict cj = cv + j * cols;
      for (int k = 0; k < kR; ++k) {
        const float wk = w[k * w_stride + j];
        for (int64_t i = 0; i < cols; ++i) u[k * cols + i] += wk * cj[i];
      }
    }
  }
}

template <int kR>
void WeightedSumBlockForWidth(int64_t nk, int64_t w_stride, int64_t cols, const float* w,
                              const float* cv, float* u) {
  switch (cols) {
    case 33:
      return WeightedSumBlock<33, kR>(nk, w_stride, cols, w, cv, u);
    case 65:
      return WeightedSumBlock<65, kR>(nk, w_stride, cols, w, cv, u);
    default:
      return WeightedSumBlock<0, kR>(nk, w_stride, cols, w, cv, u);
  }
}

}  // namespace

void SketchDecode(ThreadPool& pool, const SketchAttentionShape& shape,
                  absl::Span<const int64_t> positions, absl::Span<const SketchSlotState> slots,
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
  // Each sequence's lazy fold, planned before any pair changes its slot.
  std::vector<FoldPlan> plans(local ? B : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(plans.size()); ++i) {
    PS_DCHECK(slots[i].local_pending != nullptr);
    plans[i] = PlanFold(positions[i], b, *slots[i].local_pending);
  }

  // Split a head's rows when there are too few (sequence, head) pairs to keep every thread busy
  // (batch 1: a few heads on more threads); a share stays large enough to stream efficiently.
  const int64_t threads = pool.num_threads();
  int64_t chunks = 1;
  if (num_pairs < 2 * threads) {
    chunks = std::clamp<int64_t>((2 * threads + num_pairs - 1) / num_pairs, 1,
                                 std::max<int64_t>(1, P / kMinDecodeChunkRows));
  }

  // [v; 1] per pair, then one partial readout per (pair, chunk), and (local_exact) one more per
  // (pair, chunk) for the fold's row groups.
  const int64_t items = num_pairs * chunks;
  std::vector<float> scratch((num_pairs + items * (local ? 2 : 1)) * cols);
  float* vv = scratch.data();
  float* partial = vv + num_pairs * cols;
  float* partial_fold = partial + items * cols;
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
      float* sketched = slots[i].local_sketch + head * b * r;
      std::copy(k_local + pair * h, k_local + (pair + 1) * h, keys + m * h);
      std::copy(v + pair * h, v + (pair + 1) * h, values + m * h);
      std::copy(psi_k + pair * r, psi_k + (pair + 1) * r, sketched + m * r);
      const float* q = q_local + pair * h;
      for (int64_t j = 0; j <= m; ++j) {
        const float w = Pow4(Dot(q, keys + j * h, h));
        const float* __restrict vj = values + j * h;
        for (int64_t d = 0; d < h; ++d) u[d] += w * vj[d];
        u[h] += w;
      }
      // The previous block's rows not folded yet: phi(psi_q) . phi(psi_k) = (psi_q . psi_k)^2.
      const float* pq = psi_q + pair * r;
      for (int64_t j = b - plans[i].after; j < b; ++j) {
        const float d = Dot(pq, sketched + j * r, r);
        const float w = d * d;
        const float* __restrict vj = values + j * h;
        for (int64_t e = 0; e < h; ++e) u[e] += w * vj[e];
        u[h] += w;
      }
    }
    // The "1 +" is part of the trained function, not an epsilon (algorithm.md section 2).
    const float inv = 1.0f / (1.0f + u[h]);
    for (int64_t d = 0; d < h; ++d) out[pair * h + d] = u[d] * inv;
  };

  pool.ParallelFor(items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / chunks;
      const int64_t chunk = item % chunks;
      const int64_t i = pair / H;
      const int64_t head = pair % H;
      DecodeHead hd;
      hd.r = r;
      hd.cols = cols;
      hd.psi_q = psi_q + pair * r;
      hd.psi_k = psi_k + pair * r;
      hd.vv = vv + pair * cols;
      hd.s = slots[i].sketch + head * P * cols;
      float* u = partial + item * cols;
      const int64_t p0 = P * chunk / chunks, p1 = P * (chunk + 1) / chunks;
      if (!local) {
        DecodeRowsForWidth<DecodeMode::kPlain>(hd, p0, p1, u);
      } else if (plans[i].before == plans[i].after) {
        DecodeRowsForWidth<DecodeMode::kLocal>(hd, p0, p1, u);
      } else {
        // Fold this step's share of the previous block (buffer rows that this pair's finish()
        // does not overwrite) into S, a few state rows at a time, each group read out while it
        // is still in L1.
        const FoldPlan& plan = plans[i];
        const FoldOperands op = BufferFold(slots[i], head, b, h, r, b - plan.before);
        std::fill(u, u + cols, 0.0f);
        float* group_u = partial_fold + item * cols;
        for (int64_t g0 = p0; g0 < p1; g0 += kDecodeFoldRows) {
          const int64_t g1 = std::min(p1, g0 + kDecodeFoldRows);
          FoldRows(r, g0, g1, plan.before - plan.after, op, cols, hd.s);
          DecodeRowsForWidth<DecodeMode::kLocal>(hd, g0, g1, group_u);
          for (int64_t j = 0; j < cols; ++j) u[j] += group_u[j];
        }
      }
      if (chunks == 1) finish(pair, u);
    }
  });
  if (chunks > 1) {
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
  for (int64_t i = 0; i < static_cast<int64_t>(plans.size()); ++i) {
    *slots[i].local_pending = plans[i].after;
  }
}

void SketchPrefill(ThreadPool& pool, const SketchAttentionShape& shape, int64_t start, int64_t n,
                   const SketchSlotState& slot, const float* psi_q, const float* psi_k,
                   const float* v, const float* q_local, const float* k_local, float* out) {
  if (n <= 0) return;
  const int64_t H = shape.heads;
  const int64_t h = shape.head_dim;
  const int64_t r = shape.sketch_size;
  const int64_t b = shape.block_size;
  const int64_t P = PackedSymmetricRows(r);
  const int64_t cols = h + 1;
  const bool local = shape.local_exact;
  const int64_t head_state = P * cols;

  PS_DCHECK(start >= 0 && (!local || (b > 0 && q_local != nullptr && k_local != nullptr)));
  PrefillScratch sc;
  sc.tile_max = local ? b : (b > 0 ? b : kDefaultPlainTile);
  const int64_t tm = sc.tile_max;
  // Row stride of the transposed operands and of the weight rows: whole register blocks.
  const int64_t ts = (tm + kWeightChunk - 1) / kWeightChunk * kWeightChunk;
  if (!local) sc.bt.resize(H * r * ts);
  sc.c.resize(H * tm * cols);
  if (local) sc.kt.resize(H * h * ts);

  const int64_t fold_items = (P + kPrefillFoldRows - 1) / kPrefillFoldRows;
  // Rows of `first_row` .. b of the buffer into S, per (head, state rows).
  auto fold_buffer = [&](int64_t first_row) {
    pool.ParallelFor(H * fold_items, 1, [&](int64_t begin, int64_t finish) {
      for (int64_t item = begin; item < finish; ++item) {
        const int64_t head = item / fold_items;
        const int64_t p0 = (item % fold_items) * kPrefillFoldRows;
        FoldRows(r, p0, std::min(P, p0 + kPrefillFoldRows), b - first_row,
                 BufferFold(slot, head, b, h, r, first_row), cols, slot.sketch + head * head_state);
      }
    });
  };
  if (local) {
    // Rows of the previous block a decode left pending: folded before anything else (the tiles
    // below read S as S_prev whole, and the first one may write over those rows).
    PS_DCHECK(slot.local_pending != nullptr);
    const int64_t pending = *slot.local_pending;
    PS_DCHECK(pending == 0 || start % b + pending <= b);
    if (pending > 0) fold_buffer(b - pending);
    *slot.local_pending = 0;
  }

  const int64_t end = start + n;
  for (int64_t s = start; s < end;) {
    Tile tile;
    tile.s = s;
    const int64_t e = local ? std::min(end, (s / b + 1) * b) : std::min(end, s + tm);
    tile.t = e - s;
    tile.row0 = s - start;
    tile.koff = local ? s % b : 0;
    tile.keys = tile.koff + tile.t;
    tile.fold = local && s % b == 0 && s > 0;

    // local_exact block start: fold the completed block from the buffer into S before the tile
    // overwrites the buffer (decode's fold code, all b rows at once).
    if (tile.fold) fold_buffer(0);

    // Phase 0, per head: the local buffer, transposed and padded operands.
    pool.ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t head = h0; head < h1; ++head) {
        float* cv = sc.c.data() + head * tm * cols;
        if (local) {
          // The tile's keys join the block's buffer; the queries then attend to the whole buffer
          // up to themselves, including the block's tokens from before this call.
          float* keys = slot.local_keys + head * b * h;
          float* values = slot.local_values + head * b * h;
          float* sketched = slot.local_sketch + head * b * r;
          for (int64_t j = 0; j < tile.t; ++j) {
            const int64_t row = (tile.row0 + j) * H + head;
            std::copy(k_local + row * h, k_local + (row + 1) * h, keys + (tile.koff + j) * h);
            std::copy(v + row * h, v + (row + 1) * h, values + (tile.koff + j) * h);
            std::copy(psi_k + row * r, psi_k + (row + 1) * r, sketched + (tile.koff + j) * r);
          }
          float* kt = sc.kt.data() + head * h * ts;
          for (int64_t j = 0; j < tile.keys; ++j) {
            for (int64_t d = 0; d < h; ++d) kt[d * ts + j] = keys[j * h + d];
            std::copy(values + j * h, values + (j + 1) * h, cv + j * cols);
            cv[j * cols + h] = 1.0f;
          }
        } else {
          float* bt = sc.bt.data() + head * r * ts;
          for (int64_t j = 0; j < tile.t; ++j) {
            const float* pk = psi_k + ((tile.row0 + j) * H + head) * r;
            for (int64_t a = 0; a < r; ++a) bt[a * ts + j] = pk[a];
          }
          for (int64_t j = 0; j < tile.t; ++j) {
            const int64_t row = (tile.row0 + j) * H + head;
            std::copy(v + row * h, v + (row + 1) * h, cv + j * cols);
            cv[j * cols + h] = 1.0f;
          }
        }
      }
    });

    // Phase 1, per (head, query rows): inter-tile readout against the state before the tile (S,
    // i.e. S_prev with local_exact), intra-tile causal part, output.
    const int64_t query_items = (tile.t + kPrefillQueryRows - 1) / kPrefillQueryRows;
    pool.ParallelFor(H * query_items, 1, [&](int64_t begin, int64_t finish) {
      std::vector<float> u(kPrefillQueryRows * cols);
      std::vector<float> w(kBlock * ts);
      for (int64_t item = begin; item < finish; ++item) {
        const int64_t head = item / query_items;
        const int64_t i0 = (item % query_items) * kPrefillQueryRows;
        const int64_t i1 = std::min(tile.t, i0 + kPrefillQueryRows);
        const float* s_head = slot.sketch + head * head_state;
        const float* a_rows[kBlock];
        int64_t i = i0;
        for (; i + kBlock <= i1; i += kBlock) {
          for (int k = 0; k < kBlock; ++k) a_rows[k] = psi_q + ((tile.row0 + i + k) * H + head) * r;
          ReadoutBlockForWidth<kBlock>(r, P, cols, s_head, a_rows, u.data() + (i - i0) * cols);
        }
        for (; i < i1; ++i) {
          a_rows[0] = psi_q + ((tile.row0 + i) * H + head) * r;
          ReadoutBlockForWidth<1>(r, P, cols, s_head, a_rows, u.data() + (i - i0) * cols);
        }

        // Intra-tile part: W = tril((A B^T)^2) or tril((Q~ K~^T)^4) for kBlock queries at a
        // time (zero past each query's causal end), then U += W [V | 1].
        const float* cv = sc.c.data() + head * tm * cols;
        for (i = i0; i < i1;) {
          const int rows = i + kBlock <= i1 ? kBlock : 1;
          const int64_t nk_max = tile.koff + i + rows;  // keys the last of these queries sees
          for (int k = 0; k < rows; ++k) {
            const int64_t row = (tile.row0 + i + k) * H + head;
            const int64_t nk = tile.koff + i + k + 1;  // causal
            float* __restrict wk = w.data() + k * ts;
            if (local) {
              RowTimesMatrix(q_local + row * h, h, sc.kt.data() + head * h * ts, ts, nk, wk);
              for (int64_t j = 0; j < nk; ++j) wk[j] = Pow4(wk[j]);
            } else {
              RowTimesMatrix(psi_q + row * r, r, sc.bt.data() + head * r * ts, ts, nk, wk);
              for (int64_t j = 0; j < nk; ++j) wk[j] *= wk[j];
            }
            std::fill(wk + nk, wk + nk_max, 0.0f);  // the causal mask
          }
          float* ui = u.data() + (i - i0) * cols;
          if (rows == kBlock) {
            WeightedSumBlockForWidth<kBlock>(nk_max, ts, cols, w.data(), cv, ui);
          } else {
            WeightedSumBlockForWidth<1>(nk_max, ts, cols, w.data(), cv, ui);
          }
          for (int k = 0; k < rows; ++k) {
            const int64_t row = (tile.row0 + i + k) * H + head;
            const float* uk = ui + k * cols;
            // The "1 +" is part of the trained function, not an epsilon (algorithm.md section 2).
            const float inv = 1.0f / (1.0f + uk[h]);
            for (int64_t d = 0; d < h; ++d) out[row * h + d] = uk[d] * inv;
          }
          i += rows;
        }
      }
    });

    // Phase 2 (plain), per (head, state rows): fold the tile into S. A local_exact block waits
    // in the buffer until the next block's first token, as in decode.
    if (!local) {
      pool.ParallelFor(H * fold_items, 1, [&](int64_t begin, int64_t finish) {
        for (int64_t item = begin; item < finish; ++item) {
          const int64_t head = item / fold_items;
          const int64_t p0 = (item % fold_items) * kPrefillFoldRows;
          FoldOperands op;
          op.keys = sc.bt.data() + head * r * ts;
          op.key_row = 1;
          op.key_col = ts;
          op.values = sc.c.data() + head * tm * cols;
          op.value_row = cols;
          FoldRows(r, p0, std::min(P, p0 + kPrefillFoldRows), tile.t, op, cols,
                   slot.sketch + head * head_state);
        }
      });
    }
    s = e;
  }
}

}  // namespace ps::kernels::cpu
