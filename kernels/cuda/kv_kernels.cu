// KV-cache attention on the GPU (algorithm.md section 2; contract in kernels/backend.h, oracle:
// kernels/cpu/kv_attention.cc): the softmax and exact-polynomial baselines the polysketch kernels
// are measured against, so they are done properly.
//   Decode (flash-decoding): KvDecodeAppendKernel (block per sequence) drops the rows no query from
//   the new position on sees (list caches; the kept rows move down in order, staged through shared
//   memory group by group because the moves overlap) and appends the new row; KvDecodeSplitKernel,
//   grid (splits, H, B), 8 warps, each warp an online softmax over its share of a key range (lanes
//   over h, four keys in flight), merged per block; KvDecodeMergeKernel merges the splits. The
//   range is over the rows the query sees: every kept row, or under sparse_strided (which keeps
//   every key, row r = position r) the KeyMask::VisibleKey runs, window + t / stride rows. Bytes:
//   the attended keys and values once per step, 2 rows H h 4 per sequence. Prefill (flash-attention
//   style, no n x n matrix): KvPrefillKernel, grid (query tiles of 16, H), 8 warps of two queries
//   each; keys staged 32 at a time in shared memory (cached rows, then the chunk's own keys up to
//   the tile's last query), scores per lane, online softmax per query. Then the cache update (ring:
//   the last min(n, w) rows; list: drop, then append the new tokens kept after the last position).
// Row of a kept position after a drop: the closed form CountKept (kernels.h), so no scan.
// Numerics: fp32 dots and sums, expf; polynomial weights (x*x)*(x*x), normaliser 1 + sum w.
#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/cuda/kernels.h"

namespace ps::kernels::cuda {
namespace {

constexpr int kMaxChunks = kMaxKvHeadDim / 32;  // accumulators per lane
constexpr int kSplitWarps = 8;
constexpr int kKeysPerStep = 4;  // keys a warp scores at once in decode
constexpr int kPrefillWarps = 8;
constexpr int64_t kQueryTile = 2 * kPrefillWarps;  // two queries per warp
constexpr int64_t kKeyTile = 32;                   // one key per lane
constexpr int kAppendThreads = 256;
constexpr int64_t kStageFloats = 8192;  // compaction staging: 32 KiB
constexpr int64_t kMaxGroup = 256;      // rows per compaction group

__device__ __forceinline__ float WarpSum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
__device__ __forceinline__ float WarpMax(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}
__device__ __forceinline__ float Pow4(float x) {
  const float x2 = x * x;
  return x2 * x2;
}

// Rows per compaction group: as many as the staging buffer holds, at least 1, at most kMaxGroup.
__device__ __forceinline__ int64_t GroupRows(int64_t row) {
  const int64_t g = kStageFloats / row;
  return g < 1 ? 1 : (g > kMaxGroup ? kMaxGroup : g);
}

// Drops the rows of a list cache that no query from position t on sees: each kept row moves to
// CountKept(t, its position). Moves only go down, so groups of rows are staged through shared
// memory (all reads of a group before any of its writes, groups in ascending order). One block.
__device__ void CompactList(const KvDims& dims, int64_t t, int64_t rows, float* keys, float* values,
                            int64_t* positions, float* stage, int64_t* pos_stage, int64_t group) {
  const int64_t row = dims.heads * dims.head_dim;
  const int tid = threadIdx.x;
  for (int64_t base = 0; base < rows; base += group) {
    const int64_t g = rows - base < group ? rows - base : group;
    // Nothing moves while nothing before the group has been dropped and all of it is kept.
    __shared__ int any_move;
    if (tid == 0) any_move = 0;
    __syncthreads();
    for (int64_t i = tid; i < g; i += blockDim.x) {
      const int64_t pos = positions[base + i];
      pos_stage[i] = pos;
      if (!dims.mask.Kept(t, pos) || CountKept(dims.mask, t, pos) != base + i) any_move = 1;
    }
    __syncthreads();
    if (!any_move) continue;
    if (g == 1) {
      // One row: its destination is another row (moves go down), so no overlap; no staging
      // (this is also the path of rows wider than the staging buffer).
      const int64_t pos = pos_stage[0];
      if (dims.mask.Kept(t, pos)) {
        const int64_t dst = CountKept(dims.mask, t, pos);
        for (int64_t x = tid; x < row; x += blockDim.x) {
          keys[dst * row + x] = keys[base * row + x];
          values[dst * row + x] = values[base * row + x];
        }
        if (tid == 0) positions[dst] = pos;
      }
      __syncthreads();
      continue;
    }
    for (int part = 0; part < 2; ++part) {
      float* data = part == 0 ? keys : values;
      for (int64_t x = tid; x < g * row; x += blockDim.x) stage[x] = data[base * row + x];
      __syncthreads();
      for (int64_t x = tid; x < g * row; x += blockDim.x) {
        const int64_t pos = pos_stage[x / row];
        if (dims.mask.Kept(t, pos)) data[CountKept(dims.mask, t, pos) * row + x % row] = stage[x];
      }
      __syncthreads();
    }
    for (int64_t i = tid; i < g; i += blockDim.x) {
      const int64_t pos = pos_stage[i];
      if (dims.mask.Kept(t, pos)) positions[CountKept(dims.mask, t, pos)] = pos;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kAppendThreads)
    KvDecodeAppendKernel(KvDims dims, const int64_t* __restrict__ positions,
                         const KvSlotPtrs* __restrict__ slots, const int64_t* __restrict__ old_rows,
                         const float* __restrict__ k, const float* __restrict__ v) {
  __shared__ float stage[kStageFloats];
  __shared__ int64_t pos_stage[kMaxGroup];
  const int64_t seq = blockIdx.x;
  const int64_t row = dims.heads * dims.head_dim;
  const int64_t t = positions[seq];
  const KvSlotPtrs slot = slots[seq];
  int64_t dst;
  if (dims.ring) {
    dst = t % dims.capacity;
  } else {
    if (!dims.mask.KeepsEveryKey()) {
      const int64_t group = GroupRows(row);
      CompactList(dims, t, old_rows[seq], slot.keys, slot.values, slot.positions, stage, pos_stage,
                  group);
    }
    dst = CountKept(dims.mask, t, t);
  }
  for (int64_t x = threadIdx.x; x < row; x += blockDim.x) {
    slot.keys[dst * row + x] = k[seq * row + x];
    slot.values[dst * row + x] = v[seq * row + x];
  }
  if (threadIdx.x == 0) {
    if (dims.ring) {
      *slot.count = t + 1;
    } else {
      slot.positions[dst] = t;
      *slot.count = dst + 1;
    }
  }
}

// One (split, head, sequence): online softmax (or polynomial sums) over attended rows [r0, r1).
// Each warp takes kKeysPerStep consecutive keys per step (lanes over h): the loads and the shuffle
// reductions of those keys are independent, which hides their latency. Record: [m, l, acc[h]].
__global__ void __launch_bounds__(32 * kSplitWarps)
    KvDecodeSplitKernel(KvDims dims, const int64_t* __restrict__ positions,
                        const KvSlotPtrs* __restrict__ slots, const int64_t* __restrict__ new_rows,
                        const float* __restrict__ q, int64_t splits, int64_t per_split,
                        float* __restrict__ partial) {
  __shared__ float rec[kSplitWarps][kMaxKvHeadDim + 2];
  const int64_t H = dims.heads, h = dims.head_dim, stride = H * h;
  const int64_t split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rows = new_rows[seq];
  const int64_t r0 = split * per_split;
  const int64_t r1 = r0 + per_split < rows ? r0 + per_split : rows;
  const KvSlotPtrs slot = slots[seq];
  // The rows this query attends to: every kept row (the identity runs), or under kStrided (every
  // key kept, row r = position r) its visible runs.
  VisibleRuns attended;
  if (dims.mask.kind == KeyMask::Kind::kStrided) attended = dims.mask.StridedRuns(positions[seq]);
  const float* qv = q + seq * stride + head * h;
  const float scale = 1.0f / sqrtf(static_cast<float>(h));
  float qr[kMaxChunks], acc[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int64_t d = lane + 32 * c;
    qr[c] = d < h ? qv[d] : 0.0f;
    acc[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t j0 = r0 + warp * kKeysPerStep; j0 < r1; j0 += kSplitWarps * kKeysPerStep) {
    float dot[kKeysPerStep];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      dot[u] = 0.0f;
      if (j0 + u < r1) {
        const float* key = slot.keys + attended.Key(j0 + u) * stride + head * h;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = lane + 32 * c;
          if (d < h) dot[u] += qr[c] * key[d];
        }
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], offset);
    }
    float p[kKeysPerStep];
    if (dims.polynomial) {
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) p[u] = j0 + u < r1 ? Pow4(dot[u]) : 0.0f;
    } else {
      float step_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        if (j0 + u < r1) step_max = fmaxf(step_max, dot[u] * scale);
      }
      if (step_max > m) {
        const float corr = expf(m - step_max);  // 0 while m is -inf
        l *= corr;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) acc[c] *= corr;
        m = step_max;
      }
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) p[u] = j0 + u < r1 ? expf(dot[u] * scale - m) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      l += p[u];
      if (j0 + u < r1) {
        const float* value = slot.values + attended.Key(j0 + u) * stride + head * h;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = lane + 32 * c;
          if (d < h) acc[c] += p[u] * value[d];
        }
      }
    }
  }
  // Merge the warps.
  if (lane == 0) {
    rec[warp][0] = m;
    rec[warp][1] = l;
  }
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < h) rec[warp][2 + d] = acc[c];
  }
  __syncthreads();
  float big = -INFINITY;
  for (int w = 0; w < kSplitWarps; ++w) big = fmaxf(big, rec[w][0]);
  float* out = partial + ((seq * H + head) * splits + split) * (h + 2);
  for (int64_t x = threadIdx.x; x < h + 1; x += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kSplitWarps; ++w) {
      const float f =
          dims.polynomial ? 1.0f : (rec[w][0] == -INFINITY ? 0.0f : expf(rec[w][0] - big));
      sum += f * rec[w][1 + x];
    }
    out[1 + x] = sum;  // x == 0: l, else acc[x - 1]
  }
  if (threadIdx.x == 0) out[0] = big;
}

__global__ void KvDecodeMergeKernel(KvDims dims, int64_t splits, const float* __restrict__ partial,
                                    float* __restrict__ out) {
  const int64_t H = dims.heads, h = dims.head_dim;
  const int64_t head = blockIdx.x, seq = blockIdx.y;
  const float* recs = partial + (seq * H + head) * splits * (h + 2);
  float big = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) big = fmaxf(big, recs[s * (h + 2)]);
  float denominator = dims.polynomial ? 1.0f : 0.0f;  // the exact "1 +" of polynomial weights
  for (int64_t s = 0; s < splits; ++s) {
    const float m = recs[s * (h + 2)];
    const float f = dims.polynomial ? 1.0f : (m == -INFINITY ? 0.0f : expf(m - big));
    denominator += f * recs[s * (h + 2) + 1];
  }
  for (int64_t d = threadIdx.x; d < h; d += blockDim.x) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float m = recs[s * (h + 2)];
      const float f = dims.polynomial ? 1.0f : (m == -INFINITY ? 0.0f : expf(m - big));
      sum += f * recs[s * (h + 2) + 2 + d];
    }
    out[(seq * H + head) * h + d] = sum / denominator;
  }
}

// --- prefill -----------------------------------------------------------------------------------

struct PrefillArgs {
  int64_t start;
  int64_t n;
  int64_t old_rows;
  int64_t old_first;  // ring: position of the oldest cached row
};

// Shared: Qs [kQueryTile, h], Ks [kKeyTile, h+1], Vs [kKeyTile, h], kpos [kKeyTile].
__global__ void __launch_bounds__(32 * kPrefillWarps)
    KvPrefillKernel(KvDims dims, PrefillArgs args, KvSlotPtrs slot, const float* __restrict__ q,
                    const float* __restrict__ k, const float* __restrict__ v,
                    float* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t H = dims.heads, h = dims.head_dim, stride = H * h;
  const int64_t head = blockIdx.y;
  const int64_t i0 = args.start + blockIdx.x * kQueryTile;  // first query position
  const int64_t last_pos = args.start + args.n - 1;
  const int64_t nq = last_pos - i0 + 1 < kQueryTile ? last_pos - i0 + 1 : kQueryTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* qs = smem;
  float* ks = qs + kQueryTile * h;
  float* vs = ks + kKeyTile * (h + 1);
  int64_t* kpos = reinterpret_cast<int64_t*>(vs + kKeyTile * h);
  for (int64_t x = threadIdx.x; x < nq * h; x += blockDim.x) {
    const int64_t qi = x / h, d = x % h;
    qs[x] = q[((i0 - args.start + qi) * H + head) * h + d];
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(h));
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float acc[2][kMaxChunks] = {};

  // Keys: the cached rows, then the chunk's own from `first_new` up to the tile's last query.
  int64_t first_new = args.start;
  if (dims.mask.kind == KeyMask::Kind::kWindow && i0 - dims.mask.window + 1 > first_new) {
    first_new = i0 - dims.mask.window + 1;  // older keys of the chunk are hidden from every query
  }
  const int64_t new_keys = i0 + nq - first_new;
  const int64_t total = args.old_rows + new_keys;
  for (int64_t j0 = 0; j0 < total; j0 += kKeyTile) {
    const int64_t kc = total - j0 < kKeyTile ? total - j0 : kKeyTile;
    __syncthreads();  // the previous tile is consumed
    for (int64_t x = threadIdx.x; x < kc * h; x += blockDim.x) {
      const int64_t jj = x / h, d = x % h;
      const int64_t j = j0 + jj;
      const float* kr;
      const float* vr;
      if (j < args.old_rows) {
        const int64_t cache_row = dims.ring ? (args.old_first + j) % dims.capacity : j;
        kr = slot.keys + cache_row * stride + head * h;
        vr = slot.values + cache_row * stride + head * h;
      } else {
        const int64_t index = first_new + (j - args.old_rows) - args.start;
        kr = k + index * stride + head * h;
        vr = v + index * stride + head * h;
      }
      ks[jj * (h + 1) + d] = kr[d];
      vs[jj * h + d] = vr[d];
    }
    for (int64_t jj = threadIdx.x; jj < kc; jj += blockDim.x) {
      const int64_t j = j0 + jj;
      kpos[jj] = j < args.old_rows ? (dims.ring ? args.old_first + j : slot.positions[j])
                                   : first_new + (j - args.old_rows);
    }
    __syncthreads();
#pragma unroll
    for (int qq = 0; qq < 2; ++qq) {
      const int64_t qi = 2 * warp + qq;
      if (qi >= nq) continue;  // warp-uniform
      const int64_t i = i0 + qi;
      const bool valid = lane < kc && dims.mask.Visible(i, kpos[lane < kc ? lane : 0]);
      float s = 0.0f;
      if (lane < kc) {
        const float* kr = ks + lane * (h + 1);
        const float* qr = qs + qi * h;
        for (int64_t d = 0; d < h; ++d) s += qr[d] * kr[d];
      }
      float p;
      if (dims.polynomial) {
        p = valid ? Pow4(s) : 0.0f;
      } else {
        const float score = valid ? s * scale : -INFINITY;
        const float tile_max = WarpMax(score);
        if (tile_max == -INFINITY) continue;  // nothing visible in this tile (warp-uniform)
        if (tile_max > m[qq]) {
          const float corr = expf(m[qq] - tile_max);
          l[qq] *= corr;
#pragma unroll
          for (int c = 0; c < kMaxChunks; ++c) acc[qq][c] *= corr;
          m[qq] = tile_max;
        }
        p = valid ? expf(score - m[qq]) : 0.0f;
      }
      l[qq] += WarpSum(p);
      for (int64_t jj = 0; jj < kc; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, static_cast<int>(jj));
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = lane + 32 * c;
          if (d < h) acc[qq][c] += pj * vs[jj * h + d];
        }
      }
    }
  }
#pragma unroll
  for (int qq = 0; qq < 2; ++qq) {
    const int64_t qi = 2 * warp + qq;
    if (qi >= nq) continue;
    const float inv = dims.polynomial ? 1.0f / (1.0f + l[qq]) : 1.0f / l[qq];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < h) out[((i0 - args.start + qi) * H + head) * h + d] = acc[qq][c] * inv;
    }
  }
}

// Ring: rows of positions [first, last] from the chunk; count = start + n.
__global__ void KvRingWriteKernel(KvDims dims, int64_t start, int64_t first, int64_t last,
                                  KvSlotPtrs slot, const float* __restrict__ k,
                                  const float* __restrict__ v) {
  const int64_t row = dims.heads * dims.head_dim;
  const int64_t total = (last - first + 1) * row;
  for (int64_t x = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; x < total;
       x += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = first + x / row;
    const int64_t dst = (p % dims.capacity) * row + x % row;
    const int64_t src = (p - start) * row + x % row;
    slot.keys[dst] = k[src];
    slot.values[dst] = v[src];
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *slot.count = last + 1;
}

__global__ void __launch_bounds__(kAppendThreads)
    KvListCompactKernel(KvDims dims, int64_t t, int64_t rows, KvSlotPtrs slot) {
  __shared__ float stage[kStageFloats];
  __shared__ int64_t pos_stage[kMaxGroup];
  const int64_t row = dims.heads * dims.head_dim;
  const int64_t group = GroupRows(row);
  CompactList(dims, t, rows, slot.keys, slot.values, slot.positions, stage, pos_stage, group);
}

// List: appends the chunk's tokens kept after `last` at rows CountKept(last, p).
__global__ void KvListAppendKernel(KvDims dims, int64_t start, int64_t last, KvSlotPtrs slot,
                                   const float* __restrict__ k, const float* __restrict__ v) {
  const int64_t row = dims.heads * dims.head_dim;
  const int64_t total = (last - start + 1) * row;
  for (int64_t x = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; x < total;
       x += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = start + x / row;
    if (!dims.mask.Kept(last, p)) continue;
    const int64_t dst_row = CountKept(dims.mask, last, p);
    slot.keys[dst_row * row + x % row] = k[x];
    slot.values[dst_row * row + x % row] = v[x];
    if (x % row == 0) slot.positions[dst_row] = p;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *slot.count = CountKept(dims.mask, last, last + 1);
}

unsigned FlatBlocks(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

void LaunchKvDecode(const KvDims& dims, int64_t B, const int64_t* positions,
                    const KvSlotPtrs* slots, const int64_t* old_rows, const int64_t* new_rows,
                    const float* q, const float* k, const float* v, float* out, int64_t splits,
                    int64_t per_split, float* partial, cudaStream_t stream) {
  if (B <= 0) return;
  const unsigned H = static_cast<unsigned>(dims.heads);
  KvDecodeAppendKernel<<<static_cast<unsigned>(B), kAppendThreads, 0, stream>>>(
      dims, positions, slots, old_rows, k, v);
  KvDecodeSplitKernel<<<dim3(static_cast<unsigned>(splits), H, static_cast<unsigned>(B)),
                        32 * kSplitWarps, 0, stream>>>(dims, positions, slots, new_rows, q, splits,
                                                       per_split, partial);
  KvDecodeMergeKernel<<<dim3(H, static_cast<unsigned>(B)), 64, 0, stream>>>(dims, splits, partial,
                                                                            out);
}

void LaunchKvPrefill(const KvDims& dims, int64_t start, int64_t n, const KvSlotPtrs& slot,
                     int64_t old_rows, int64_t kept_after_drop, const float* q, const float* k,
                     const float* v, float* out, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t h = dims.head_dim;
  PrefillArgs args{start, n, old_rows, start - old_rows};
  const size_t shared =
      static_cast<size_t>(kQueryTile * h + kKeyTile * (h + 1) + kKeyTile * h) * sizeof(float) +
      kKeyTile * sizeof(int64_t);
  if (shared > 48 * 1024) {
    cudaFuncSetAttribute(KvPrefillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(shared));
  }
  KvPrefillKernel<<<dim3(static_cast<unsigned>((n + kQueryTile - 1) / kQueryTile),
                         static_cast<unsigned>(dims.heads)),
                    32 * kPrefillWarps, shared, stream>>>(dims, args, slot, q, k, v, out);
  // The cache changes only after every output is computed (stream order).
  const int64_t last = start + n - 1;
  const int64_t row = dims.heads * h;
  if (dims.ring) {
    const int64_t first = last - dims.capacity + 1 > start ? last - dims.capacity + 1 : start;
    KvRingWriteKernel<<<FlatBlocks((last - first + 1) * row), 256, 0, stream>>>(dims, start, first,
                                                                                last, slot, k, v);
    return;
  }
  if (!dims.mask.KeepsEveryKey() && old_rows > kept_after_drop) {
    KvListCompactKernel<<<1, kAppendThreads, 0, stream>>>(dims, last, old_rows, slot);
  }
  KvListAppendKernel<<<FlatBlocks(n * row), 256, 0, stream>>>(dims, start, last, slot, k, v);
}

}  // namespace ps::kernels::cuda
