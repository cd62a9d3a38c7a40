// PolySketch attention on the GPU (algorithm.md sections 3 and 4; contract in kernels/backend.h,
// oracle: kernels/cpu/sketch_attention.cc). fp32 state, fp32 arithmetic throughout (section 5).
//
// Decode, two kernels per layer:
//   1. SketchDecodeRowsKernel, grid (splits, H, B), 8 warps: each block streams rows [p0, p1) of
//      one (sequence, head)'s packed state once, a warp per row and the lanes over its h+1
//      columns, fusing update and readout: plain S += wk [v; 1], u += wq S; local_exact u += wq S
//      (the current block waits in the local buffer); at a local_exact block start the warp first
//      folds the completed block into its row, S[p] += sum_{j < b} psi_j[a] psi_j[c] [v_j; 1]
//      (one [P, b] x [b, h+1] GEMM over the rows, buffer read through L1/L2). The GPU folds
//      eagerly: rows a CPU decode left pending (*local_pending, the buffer's last rows; a state
//      restored from a CPU server) are folded the same way by the next step, which clears the
//      count. Splitting P over `splits` blocks gives a batch of one enough blocks to fill the GPU.
//      Bytes per (sequence, head): 2 P (h+1) 4 plain, P (h+1) 4 local_exact, 2 P (h+1) 4 plus the
//      buffer's b (r + h) 4 at a block start.
//   2. SketchDecodeFinishKernel, grid (H, B): sums the split partials, appends (psi(k), k~, v)
//      to the local buffer and adds the exact (q~ . k~_j)^4 terms, then o = u[:h] / (1 + u[h]).
// Prefill, per tile (the trained block with local_exact, else 256 tokens), as the CPU does:
//   rows left pending by a decode are folded first (SketchPrefillFoldKernel, the count read on
//   the device); at a local_exact block start SketchPrefillFoldKernel folds the buffer's completed
//   block into S; append the tile to the local buffer; SketchPrefillReadoutKernel, grid (query
//   tiles of 16, H): phi(psi_q) S as a [16, P] x [P, h+1] product staged through shared memory,
//   plus the causal intra-tile weights (A B^T)^2 or (Q~ K~^T)^4 times [V | 1]; then (plain)
//   SketchPrefillFoldKernel, grid (row tiles of 16, H): S += sum_j (B_j (x) B_j) [v_j; 1] over the
//   tile.
#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/cuda/kernels.h"
#include "kernels/packed_index.h"

namespace ps::kernels::cuda {
namespace {

constexpr int kDecodeWarps = 8;
constexpr int kFinishThreads = 128;
constexpr int kPrefillThreads = 256;
constexpr int64_t kQueryTile = 16;  // queries per readout block
constexpr int64_t kRowChunk = 16;   // state rows staged per step of the readout
constexpr int64_t kKeyChunk = 16;   // keys staged per step of the intra-tile part and the fold
constexpr int64_t kFoldRows = 16;   // state rows per fold block
constexpr int64_t kPlainTile = 256;

__device__ __forceinline__ float WarpSum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float Pow4(float x) {
  const float x2 = x * x;
  return x2 * x2;
}

// (a, c) of packed row p (PackedSymmetricIndex's inverse), O(r).
__device__ __forceinline__ void PairOf(int64_t p, int64_t r, int& a, int& c) {
  int64_t aa = 0;
  while (aa + 1 < r && PackedSymmetricIndex(aa + 1, aa + 1, r) <= p) ++aa;
  a = static_cast<int>(aa);
  c = static_cast<int>(aa + (p - PackedSymmetricIndex(aa, aa, r)));
}

// Fills pairs[p] = a << 16 | c for every packed row (r < 65536), block-cooperatively.
__device__ void FillPairTable(int64_t r, int* pairs) {
  for (int64_t a = threadIdx.x; a < r; a += blockDim.x) {
    const int64_t base = PackedSymmetricIndex(a, a, r);
    for (int64_t c = a; c < r; ++c) pairs[base + c - a] = static_cast<int>(a << 16 | c);
  }
}

enum Mode { kPlain = 0, kLocal = 1, kLocalFold = 2 };

// --- decode ------------------------------------------------------------------------------------

// Shared memory: wq, wk [rows], vv [cols], acc [kDecodeWarps, cols].
__global__ void __launch_bounds__(32 * kDecodeWarps)
    SketchDecodeRowsKernel(SketchDims dims, const int64_t* __restrict__ positions,
                           const SketchSlotPtrs* __restrict__ slots,
                           const float* __restrict__ psi_q, const float* __restrict__ psi_k,
                           const float* __restrict__ v, int64_t splits, float* partial) {
  extern __shared__ float smem[];
  const int64_t H = dims.heads, h = dims.head_dim, r = dims.sketch_size, cols = h + 1;
  const int64_t P = PackedSymmetricRows(r);
  const int64_t split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const int64_t pair = seq * H + head;
  const int64_t p0 = P * split / splits, p1 = P * (split + 1) / splits;
  const int64_t rows = p1 - p0;
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int tid = warp * 32 + lane;
  constexpr int kThreads = 32 * kDecodeWarps;

  float* wq = smem;
  float* wk = wq + rows;
  float* vv = wk + rows;
  float* acc = vv + cols;

  const int64_t t = positions[seq];
  const bool local = dims.local_exact;
  const SketchSlotPtrs slot = slots[seq];
  const int64_t b = dims.block_size;
  // local_exact: buffer rows [fold_from, b) go into S now: the completed block at a block start,
  // else the rows a lazy (CPU) decode left pending, if any.
  const int64_t fold_from = !local ? b : (t % b == 0 && t > 0 ? 0 : b - *slot.local_pending);
  const int mode = !local ? kPlain : (fold_from < b ? kLocalFold : kLocal);
  const float* pq = psi_q + pair * r;
  const float* pk = psi_k + pair * r;
  for (int64_t p = p0 + tid; p < p1; p += kThreads) {
    int a, c;
    PairOf(p, r, a, c);
    wk[p - p0] = pk[a] * pk[c];
    // Off-diagonal rows stand for both (a, c) and (c, a).
    wq[p - p0] = (a == c ? 1.0f : 2.0f) * pq[a] * pq[c];
  }
  for (int64_t j = tid; j < cols; j += kThreads) vv[j] = j < h ? v[pair * h + j] : 1.0f;
  for (int64_t j = tid; j < kDecodeWarps * cols; j += kThreads) acc[j] = 0.0f;
  __syncthreads();

  float* s = slot.sketch + head * P * cols;
  // The completed block (local_exact fold): psi(k) [b, r] and v [b, h] of this head.
  const float* lsk = local ? slot.local_sketch + head * b * r : nullptr;
  const float* lv = local ? slot.local_values + head * b * h : nullptr;
  float* my_acc = acc + warp * cols;  // each lane owns its columns: no races
  for (int64_t p = p0 + warp; p < p1; p += kDecodeWarps) {
    const float wkp = wk[p - p0];
    const float wqp = wq[p - p0];
    float* srow = s + p * cols;
    int a = 0, c = 0;
    if (mode == kLocalFold) PairOf(p, r, a, c);
    for (int64_t j = lane; j < cols; j += 32) {
      float x = srow[j];
      if (mode == kPlain) {
        x += wkp * vv[j];
        srow[j] = x;
      } else if (mode == kLocalFold) {
        float fold = 0.0f;
        for (int64_t jj = fold_from; jj < b; ++jj) {
          const float w = lsk[jj * r + a] * lsk[jj * r + c];
          fold += w * (j < h ? lv[jj * h + j] : 1.0f);
        }
        x += fold;
        srow[j] = x;
      }
      my_acc[j] += wqp * x;
    }
  }
  __syncthreads();
  for (int64_t j = tid; j < cols; j += kThreads) {
    float u = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) u += acc[w * cols + j];
    partial[(pair * splits + split) * cols + j] = u;
  }
}

// Shared memory: u [cols], w [b] (local_exact).
__global__ void __launch_bounds__(kFinishThreads)
    SketchDecodeFinishKernel(SketchDims dims, const int64_t* __restrict__ positions,
                             const SketchSlotPtrs* __restrict__ slots,
                             const float* __restrict__ psi_k, const float* __restrict__ v,
                             const float* __restrict__ q_local, const float* __restrict__ k_local,
                             int64_t splits, const float* __restrict__ partial,
                             float* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t H = dims.heads, h = dims.head_dim, cols = h + 1;
  const int64_t head = blockIdx.x, seq = blockIdx.y;
  const int64_t pair = seq * H + head;
  const int tid = threadIdx.x;
  float* u = smem;
  float* w = u + cols;
  for (int64_t j = tid; j < cols; j += kFinishThreads) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[(pair * splits + s) * cols + j];
    u[j] = sum;
  }
  if (dims.local_exact) {
    const int64_t b = dims.block_size, r = dims.sketch_size;
    const int64_t m = positions[seq] % b;  // rows of this block before this token
    const SketchSlotPtrs slot = slots[seq];
    // Plain (not __restrict__/read-only) pointers: this block writes row m and reads it back.
    // The rows kernel, earlier on the stream, has already folded the previous block's rows, and
    // every pending one: none is left.
    if (head == 0 && tid == 0) *slot.local_pending = 0;
    float* keys = slot.local_keys + head * b * h;
    float* values = slot.local_values + head * b * h;
    for (int64_t d = tid; d < h; d += kFinishThreads) {
      keys[m * h + d] = k_local[pair * h + d];
      values[m * h + d] = v[pair * h + d];
    }
    for (int64_t a = tid; a < r; a += kFinishThreads) {
      slot.local_sketch[(head * b + m) * r + a] = psi_k[pair * r + a];
    }
    __syncthreads();  // the row's writes are visible to the whole block
    const int lane = tid % 32, warp = tid / 32;
    const float* q = q_local + pair * h;
    for (int64_t j = warp; j <= m; j += kFinishThreads / 32) {
      float dot = 0.0f;
      for (int64_t d = lane; d < h; d += 32) dot += q[d] * keys[j * h + d];
      dot = WarpSum(dot);
      if (lane == 0) w[j] = Pow4(dot);
    }
    __syncthreads();
    for (int64_t d = tid; d < cols; d += kFinishThreads) {
      float sum = 0.0f;
      for (int64_t j = 0; j <= m; ++j) sum += w[j] * (d < h ? values[j * h + d] : 1.0f);
      u[d] += sum;
    }
  }
  __syncthreads();
  // The "1 +" is part of the trained function, not an epsilon (algorithm.md section 2).
  const float inv = 1.0f / (1.0f + u[h]);
  for (int64_t d = tid; d < h; d += kFinishThreads) out[pair * h + d] = u[d] * inv;
}

// --- prefill -----------------------------------------------------------------------------------

struct TileArgs {
  int64_t row0;  // row of the tile's first position in the call's buffers
  int64_t t;     // tokens
  int64_t koff;  // local_exact: buffer rows before the tile that its queries see
};

// The t keys a fold adds, per head: psi(k_j)[a] = keys[head * key_head + j * key_row + a] and
// value column d < h of token j = values[head * value_head + j * value_row + d] (the normaliser
// column is 1). Plain tiles fold the call's rows ([n, H, r] and [n, H, h] from the tile's first
// row); a local_exact block start folds the slot's buffer ([H, b, r] and [H, b, h]). With
// `pending` set, the source is the buffer's last *pending of its t rows (read on the device).
struct FoldSource {
  const float* keys;
  int64_t key_head, key_row;
  const float* values;
  int64_t value_head, value_row;
  int64_t t;
  const int64_t* pending = nullptr;
};

// Clears a slot's pending count once the rows are folded.
__global__ void ClearPendingKernel(int64_t* pending) { *pending = 0; }

// Appends the tile's psi(k), k~ and v to the local buffer rows koff .. koff+t-1 of every head.
__global__ void AppendLocalKernel(SketchDims dims, TileArgs tile, const float* __restrict__ psi_k,
                                  const float* __restrict__ k_local, const float* __restrict__ v,
                                  float* sketched, float* keys, float* values) {
  const int64_t H = dims.heads, h = dims.head_dim, r = dims.sketch_size, b = dims.block_size;
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = first; i < tile.t * H * h; i += stride) {
    const int64_t d = i % h;
    const int64_t head = (i / h) % H;
    const int64_t j = i / (h * H);
    const int64_t src = ((tile.row0 + j) * H + head) * h + d;
    const int64_t dst = (head * b + tile.koff + j) * h + d;
    keys[dst] = k_local[src];
    values[dst] = v[src];
  }
  for (int64_t i = first; i < tile.t * H * r; i += stride) {
    const int64_t a = i % r;
    const int64_t head = (i / r) % H;
    const int64_t j = i / (r * H);
    sketched[(head * b + tile.koff + j) * r + a] = psi_k[((tile.row0 + j) * H + head) * r + a];
  }
}

// Shared floats of the readout kernel (see its layout below).
int64_t ReadoutSharedFloats(const SketchDims& dims) {
  const int64_t h = dims.head_dim, r = dims.sketch_size, cols = h + 1;
  const int64_t P = PackedSymmetricRows(r);
  const int64_t kdim = dims.local_exact ? h : r;
  const int64_t stage_rows = kRowChunk * cols;
  const int64_t stage_keys = kKeyChunk * (kdim + 1) + kKeyChunk * cols;
  return P /* pair table (ints) */ + kQueryTile * (r + 1) +
         (dims.local_exact ? kQueryTile * (h + 1) : 0) +
         (stage_rows > stage_keys ? stage_rows : stage_keys) +
         kQueryTile * (kRowChunk > kKeyChunk ? kRowChunk : kKeyChunk) + kQueryTile * cols;
}

// One block: queries [i0, i0 + nq) of the tile, one head. u [nq, cols] accumulates in shared
// memory (each thread owns fixed entries), staged operands are padded to avoid bank conflicts.
__global__ void __launch_bounds__(kPrefillThreads)
    SketchPrefillReadoutKernel(SketchDims dims, TileArgs tile, const SketchSlotPtrs slot,
                               const float* __restrict__ psi_q, const float* __restrict__ psi_k,
                               const float* __restrict__ v, const float* __restrict__ q_local,
                               float* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t H = dims.heads, h = dims.head_dim, r = dims.sketch_size, cols = h + 1;
  const int64_t P = PackedSymmetricRows(r);
  const bool local = dims.local_exact;
  const int64_t kdim = local ? h : r;
  const int64_t head = blockIdx.y;
  const int64_t i0 = blockIdx.x * kQueryTile;
  const int64_t nq = tile.t - i0 < kQueryTile ? tile.t - i0 : kQueryTile;
  const int tid = threadIdx.x;

  int* pairs = reinterpret_cast<int*>(smem);
  float* pq = smem + P;                   // [kQueryTile, r+1]
  float* ql = pq + kQueryTile * (r + 1);  // [kQueryTile, h+1] (local)
  float* stage = ql + (local ? kQueryTile * (h + 1) : 0);
  const int64_t stage_rows = kRowChunk * cols;
  const int64_t stage_keys = kKeyChunk * (kdim + 1) + kKeyChunk * cols;
  float* wts = stage + (stage_rows > stage_keys ? stage_rows : stage_keys);
  const int64_t wstride = kRowChunk > kKeyChunk ? kRowChunk : kKeyChunk;
  float* u = wts + kQueryTile * wstride;  // [kQueryTile, cols]

  FillPairTable(r, pairs);
  for (int64_t x = tid; x < nq * r; x += kPrefillThreads) {
    const int64_t q = x / r, a = x % r;
    pq[q * (r + 1) + a] = psi_q[((tile.row0 + i0 + q) * H + head) * r + a];
  }
  if (local) {
    for (int64_t x = tid; x < nq * h; x += kPrefillThreads) {
      const int64_t q = x / h, d = x % h;
      ql[q * (h + 1) + d] = q_local[((tile.row0 + i0 + q) * H + head) * h + d];
    }
  }
  for (int64_t x = tid; x < kQueryTile * cols; x += kPrefillThreads) u[x] = 0.0f;
  __syncthreads();

  // Inter-tile: u += phi(psi_q) S over all P rows (S_prev with local_exact).
  const float* s_head = slot.sketch + head * P * cols;
  for (int64_t p0 = 0; p0 < P; p0 += kRowChunk) {
    const int64_t rc = P - p0 < kRowChunk ? P - p0 : kRowChunk;
    for (int64_t x = tid; x < rc * cols; x += kPrefillThreads) stage[x] = s_head[p0 * cols + x];
    for (int64_t x = tid; x < nq * rc; x += kPrefillThreads) {
      const int64_t q = x / rc, pp = x % rc;
      const int ac = pairs[p0 + pp];
      const int a = ac >> 16, c = ac & 0xffff;
      wts[q * wstride + pp] = (a == c ? 1.0f : 2.0f) * pq[q * (r + 1) + a] * pq[q * (r + 1) + c];
    }
    __syncthreads();
    for (int64_t x = tid; x < nq * cols; x += kPrefillThreads) {
      const int64_t q = x / cols, j = x % cols;
      float sum = 0.0f;
      for (int64_t pp = 0; pp < rc; ++pp) sum += wts[q * wstride + pp] * stage[pp * cols + j];
      u[x] += sum;
    }
    __syncthreads();
  }

  // Intra-tile: keys 0 .. koff + i (buffer rows with local_exact, else the tile's own tokens).
  float* kst = stage;                           // [kKeyChunk, kdim+1]
  float* vst = stage + kKeyChunk * (kdim + 1);  // [kKeyChunk, cols]
  const int64_t last_key = tile.koff + i0 + nq - 1;
  const float* lkeys = local ? slot.local_keys + head * dims.block_size * h : nullptr;
  const float* lvalues = local ? slot.local_values + head * dims.block_size * h : nullptr;
  for (int64_t j0 = 0; j0 <= last_key; j0 += kKeyChunk) {
    const int64_t kc = last_key + 1 - j0 < kKeyChunk ? last_key + 1 - j0 : kKeyChunk;
    for (int64_t x = tid; x < kc * kdim; x += kPrefillThreads) {
      const int64_t jj = x / kdim, d = x % kdim;
      const int64_t j = j0 + jj;
      kst[jj * (kdim + 1) + d] =
          local ? lkeys[j * h + d] : psi_k[((tile.row0 + j) * H + head) * r + d];
    }
    for (int64_t x = tid; x < kc * cols; x += kPrefillThreads) {
      const int64_t jj = x / cols, d = x % cols;
      const int64_t j = j0 + jj;
      float value = 1.0f;
      if (d < h) value = local ? lvalues[j * h + d] : v[((tile.row0 + j) * H + head) * h + d];
      vst[x] = value;
    }
    __syncthreads();
    for (int64_t x = tid; x < nq * kc; x += kPrefillThreads) {
      const int64_t q = x / kc, jj = x % kc;
      float weight = 0.0f;
      if (j0 + jj <= tile.koff + i0 + q) {  // causal
        const float* qa = local ? ql + q * (h + 1) : pq + q * (r + 1);
        const float* kb = kst + jj * (kdim + 1);
        float dot = 0.0f;
        for (int64_t d = 0; d < kdim; ++d) dot += qa[d] * kb[d];
        weight = local ? Pow4(dot) : dot * dot;
      }
      wts[q * wstride + jj] = weight;
    }
    __syncthreads();
    for (int64_t x = tid; x < nq * cols; x += kPrefillThreads) {
      const int64_t q = x / cols, j = x % cols;
      float sum = 0.0f;
      for (int64_t jj = 0; jj < kc; ++jj) sum += wts[q * wstride + jj] * vst[jj * cols + j];
      u[x] += sum;
    }
    __syncthreads();
  }

  for (int64_t x = tid; x < nq * h; x += kPrefillThreads) {
    const int64_t q = x / h, d = x % h;
    // The "1 +" is part of the trained function, not an epsilon (algorithm.md section 2).
    out[((tile.row0 + i0 + q) * H + head) * h + d] = u[q * cols + d] / (1.0f + u[q * cols + h]);
  }
}

int64_t FoldSharedFloats(const SketchDims& dims) {
  const int64_t h = dims.head_dim, r = dims.sketch_size, cols = h + 1;
  return PackedSymmetricRows(r) + kKeyChunk * (r + 1) + kKeyChunk * cols + kFoldRows * kKeyChunk +
         kFoldRows * cols;
}

// One block: state rows [p0, p0 + fr) of one head += sum over the source's t tokens.
__global__ void __launch_bounds__(kPrefillThreads)
    SketchPrefillFoldKernel(SketchDims dims, FoldSource src, float* target_all) {
  extern __shared__ float smem[];
  const int64_t h = dims.head_dim, r = dims.sketch_size, cols = h + 1;
  const int64_t P = PackedSymmetricRows(r);
  const int64_t head = blockIdx.y;
  const int64_t p0 = blockIdx.x * kFoldRows;
  const int64_t fr = P - p0 < kFoldRows ? P - p0 : kFoldRows;
  const int tid = threadIdx.x;
  const int64_t t = src.pending != nullptr ? *src.pending : src.t;
  if (t == 0) return;  // nothing pending (uniform across the block: no barrier is skipped half)
  const int64_t first = src.t - t;  // 0 unless only the last rows are folded
  int* pairs = reinterpret_cast<int*>(smem);
  float* kst = smem + P;                     // [kKeyChunk, r+1]
  float* vst = kst + kKeyChunk * (r + 1);    // [kKeyChunk, cols]
  float* wts = vst + kKeyChunk * cols;       // [kFoldRows, kKeyChunk]
  float* acc = wts + kFoldRows * kKeyChunk;  // [kFoldRows, cols]
  FillPairTable(r, pairs);
  for (int64_t x = tid; x < kFoldRows * cols; x += kPrefillThreads) acc[x] = 0.0f;
  __syncthreads();
  const float* keys = src.keys + head * src.key_head + first * src.key_row;
  const float* values = src.values + head * src.value_head + first * src.value_row;
  for (int64_t j0 = 0; j0 < t; j0 += kKeyChunk) {
    const int64_t kc = t - j0 < kKeyChunk ? t - j0 : kKeyChunk;
    for (int64_t x = tid; x < kc * r; x += kPrefillThreads) {
      const int64_t jj = x / r, a = x % r;
      kst[jj * (r + 1) + a] = keys[(j0 + jj) * src.key_row + a];
    }
    for (int64_t x = tid; x < kc * cols; x += kPrefillThreads) {
      const int64_t jj = x / cols, d = x % cols;
      vst[x] = d < h ? values[(j0 + jj) * src.value_row + d] : 1.0f;
    }
    __syncthreads();
    for (int64_t x = tid; x < fr * kc; x += kPrefillThreads) {
      const int64_t pp = x / kc, jj = x % kc;
      const int ac = pairs[p0 + pp];
      wts[pp * kKeyChunk + jj] = kst[jj * (r + 1) + (ac >> 16)] * kst[jj * (r + 1) + (ac & 0xffff)];
    }
    __syncthreads();
    for (int64_t x = tid; x < fr * cols; x += kPrefillThreads) {
      const int64_t pp = x / cols, j = x % cols;
      float sum = 0.0f;
      for (int64_t jj = 0; jj < kc; ++jj) sum += wts[pp * kKeyChunk + jj] * vst[jj * cols + j];
      acc[x] += sum;
    }
    __syncthreads();
  }
  float* target = target_all + (head * P + p0) * cols;  // rows are contiguous: one flat range
  for (int64_t x = tid; x < fr * cols; x += kPrefillThreads) target[x] += acc[x];
}

unsigned FlatBlocks(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel (large h or r).
template <typename Kernel>
void AllowSharedBytes(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
  }
}

}  // namespace

void LaunchSketchDecode(const SketchDims& dims, int64_t B, const int64_t* positions,
                        const SketchSlotPtrs* slots, const float* psi_q, const float* psi_k,
                        const float* v, const float* q_local, const float* k_local, float* out,
                        int64_t splits, float* partial, cudaStream_t stream) {
  if (B <= 0) return;
  const int64_t H = dims.heads, cols = dims.head_dim + 1;
  const int64_t P = PackedSymmetricRows(dims.sketch_size);
  const int64_t rows = (P + splits - 1) / splits;
  const size_t rows_shared =
      static_cast<size_t>(2 * rows + cols + kDecodeWarps * cols) * sizeof(float);
  AllowSharedBytes(SketchDecodeRowsKernel, static_cast<int64_t>(rows_shared));
  SketchDecodeRowsKernel<<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(H),
                                static_cast<unsigned>(B)),
                           dim3(32, kDecodeWarps), rows_shared, stream>>>(
      dims, positions, slots, psi_q, psi_k, v, splits, partial);
  const size_t finish_shared =
      static_cast<size_t>(cols + (dims.local_exact ? dims.block_size : 0)) * sizeof(float);
  AllowSharedBytes(SketchDecodeFinishKernel, static_cast<int64_t>(finish_shared));
  SketchDecodeFinishKernel<<<dim3(static_cast<unsigned>(H), static_cast<unsigned>(B)),
                             kFinishThreads, finish_shared, stream>>>(
      dims, positions, slots, psi_k, v, q_local, k_local, splits, partial, out);
}

void LaunchSketchPrefill(const SketchDims& dims, int64_t start, int64_t n,
                         const SketchSlotPtrs& slot, const float* psi_q, const float* psi_k,
                         const float* v, const float* q_local, const float* k_local, float* out,
                         cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t H = dims.heads, h = dims.head_dim, r = dims.sketch_size, b = dims.block_size;
  const int64_t P = PackedSymmetricRows(r);
  const bool local = dims.local_exact;
  // Plain sketches: the result does not depend on the tile (algorithm.md section 3), so the GPU
  // uses its own (kPlainTile) whatever b says; local_exact: the trained block.
  const int64_t tile_max = local ? b : kPlainTile;
  const size_t readout_shared = static_cast<size_t>(ReadoutSharedFloats(dims)) * sizeof(float);
  const size_t fold_shared = static_cast<size_t>(FoldSharedFloats(dims)) * sizeof(float);
  AllowSharedBytes(SketchPrefillReadoutKernel, static_cast<int64_t>(readout_shared));
  AllowSharedBytes(SketchPrefillFoldKernel, static_cast<int64_t>(fold_shared));
  const dim3 fold_grid(static_cast<unsigned>((P + kFoldRows - 1) / kFoldRows),
                       static_cast<unsigned>(H));
  if (local) {
    // Rows a decode left pending, before any tile reads S or writes the buffer.
    FoldSource pending{slot.local_sketch, b * r, r, slot.local_values, b * h, h, b};
    pending.pending = slot.local_pending;
    SketchPrefillFoldKernel<<<fold_grid, kPrefillThreads, fold_shared, stream>>>(dims, pending,
                                                                                 slot.sketch);
    ClearPendingKernel<<<1, 1, 0, stream>>>(slot.local_pending);
  }
  const int64_t end = start + n;
  for (int64_t s = start; s < end;) {
    const int64_t e = local ? (end < (s / b + 1) * b ? end : (s / b + 1) * b)
                            : (end < s + tile_max ? end : s + tile_max);
    TileArgs tile{s - start, e - s, local ? s % b : 0};
    if (local && s % b == 0 && s > 0) {
      // The completed block, from the buffer, before the tile overwrites it.
      const FoldSource block{slot.local_sketch, b * r, r, slot.local_values, b * h, h, b};
      SketchPrefillFoldKernel<<<fold_grid, kPrefillThreads, fold_shared, stream>>>(dims, block,
                                                                                   slot.sketch);
    }
    if (local) {
      AppendLocalKernel<<<FlatBlocks(tile.t * H * h), 256, 0, stream>>>(
          dims, tile, psi_k, k_local, v, slot.local_sketch, slot.local_keys, slot.local_values);
    }
    SketchPrefillReadoutKernel<<<dim3(static_cast<unsigned>((tile.t + kQueryTile - 1) / kQueryTile),
                                      static_cast<unsigned>(H)),
                                 kPrefillThreads, readout_shared, stream>>>(dims, tile, slot, psi_q,
                                                                            psi_k, v, q_local, out);
    // A completed local_exact block stays in the buffer until the next block's first token, as
    // in decode; a plain tile is folded now.
    if (!local) {
      const FoldSource rows{
          psi_k + tile.row0 * H * r, r, H * r, v + tile.row0 * H * h, h, H * h, tile.t};
      SketchPrefillFoldKernel<<<fold_grid, kPrefillThreads, fold_shared, stream>>>(dims, rows,
                                                                                   slot.sketch);
    }
    s = e;
  }
}

}  // namespace ps::kernels::cuda
