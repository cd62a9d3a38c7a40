// Host-callable launchers of the CUDA backend's kernels (defined in the .cu files beside this
// header). Every launcher enqueues work on `stream` and returns at once; the pointers are device
// memory. No absl here: the .cu files compile with nvcc, the backend (cuda_backend.cc) with the
// host compiler. Shapes and numerics are those of kernels/backend.h; each .cu file documents its
// kernels' thread mapping and bytes moved.
//
// Shape letters (algorithm.md): m rows, D width, H heads, h head width, r sketch size,
// P = r(r+1)/2, b block size, B sequences of a decode step, n tokens of a prefill.
#ifndef POLYSKETCH_KERNELS_CUDA_KERNELS_H_
#define POLYSKETCH_KERNELS_CUDA_KERNELS_H_

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/attention_mask.h"

namespace ps::kernels::cuda {

// --- dense (dense_kernels.cu) ------------------------------------------------------------------
// y[i] = bf16(x[i]) (round to nearest even), n elements; y is __nv_bfloat16*.
void LaunchF32ToBf16(const float* x, int64_t n, void* y, cudaStream_t stream);
void LaunchLayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma, const float* beta,
                     float eps, float* y, cudaStream_t stream);
// tokens [m] int32, positions [m] int64 (device copies of the host spans; positions may be null
// when !sinusoidal, resp. !rope).
void LaunchEmbed(const float* table, int64_t d, const int32_t* tokens, const int64_t* positions,
                 int64_t m, bool sinusoidal, float* x, cudaStream_t stream);
void LaunchSplitQkvRope(const float* qkv, int64_t m, int64_t heads, int64_t head_dim,
                        const int64_t* positions, bool rope, float* q, float* k, float* v,
                        cudaStream_t stream);
// x, y [m, H, h]: y = RoPE(x) at positions[row] (Backend::Rope).
void LaunchRope(const float* x, int64_t m, int64_t heads, int64_t head_dim,
                const int64_t* positions, float* y, cudaStream_t stream);
void LaunchGeluGate(const float* up, int64_t m, int64_t f, float* out, cudaStream_t stream);
void LaunchGelu(float* x, int64_t n, cudaStream_t stream);
void LaunchMultiply(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream);
void LaunchSketchCombine(const float* f1, const float* f2, int64_t n, int64_t r, float* psi,
                         cudaStream_t stream);
void LaunchAddBias(float* y, int64_t m, int64_t n, const float* bias, cudaStream_t stream);

// --- polysketch attention (sketch_kernels.cu) ----------------------------------------------------
// The same pointers as kernels::SketchSlotState (kept free of backend.h's absl includes).
struct SketchSlotPtrs {
  float* sketch;
  float* local_sketch;
  float* local_keys;
  float* local_values;
  int64_t* local_pending;  // local_exact: rows of the previous block not yet folded (device)
};

struct SketchDims {
  int64_t heads;        // H
  int64_t head_dim;     // h
  int64_t sketch_size;  // r
  bool local_exact;
  int64_t block_size;  // b
};

// Rows of a head's packed state one decode block handles at most (its weights live in shared
// memory): the backend splits P into at least ceil(P / kMaxDecodeRowsPerBlock) parts.
inline constexpr int64_t kMaxDecodeRowsPerBlock = 2048;

// One decode step for B sequences (Backend::SketchDecode). positions [B], slots [B] are device
// copies; `splits` blocks share each (sequence, head)'s P rows; partial: scratch of
// B * H * splits * (h + 1) floats.
void LaunchSketchDecode(const SketchDims& dims, int64_t B, const int64_t* positions,
                        const SketchSlotPtrs* slots, const float* psi_q, const float* psi_k,
                        const float* v, const float* q_local, const float* k_local, float* out,
                        int64_t splits, float* partial, cudaStream_t stream);

// Prefill of n tokens from `start` (Backend::SketchPrefill): the block algorithm, a few kernels
// per tile. `slot` holds device pointers.
void LaunchSketchPrefill(const SketchDims& dims, int64_t start, int64_t n,
                         const SketchSlotPtrs& slot, const float* psi_q, const float* psi_k,
                         const float* v, const float* q_local, const float* k_local, float* out,
                         cudaStream_t stream);

// --- KV-cache attention (kv_kernels.cu) ----------------------------------------------------------
struct KvSlotPtrs {
  float* keys;
  float* values;
  int64_t* positions;
  int64_t* count;
};

struct KvDims {
  int64_t heads;     // H
  int64_t head_dim;  // h
  bool polynomial;   // kPolynomial, else kSoftmax
  KeyMask mask;
  bool ring;
  int64_t capacity;
};

// Largest head width the KV kernels support (accumulators in registers: 8 x 32 lanes).
inline constexpr int64_t kMaxKvHeadDim = 256;

// One decode step for B sequences (Backend::KvDecode). positions, slots, old_rows (kept rows
// before the step), new_rows (rows the query attends to after it: the kept rows, or under
// kStrided KeyMask::NumVisible(position), walked through VisibleKey) are device arrays [B]. Keys
// are split into `splits` ranges of `per_split` rows; partial: B * H * splits * (h + 2) floats.
void LaunchKvDecode(const KvDims& dims, int64_t B, const int64_t* positions,
                    const KvSlotPtrs* slots, const int64_t* old_rows, const int64_t* new_rows,
                    const float* q, const float* k, const float* v, float* out, int64_t splits,
                    int64_t per_split, float* partial, cudaStream_t stream);

// Prefill of n tokens from `start` (Backend::KvPrefill); old_rows: rows cached before the call
// (ring: min(start, w)); kept_after_drop: list caches, the old rows kept after start+n-1.
void LaunchKvPrefill(const KvDims& dims, int64_t start, int64_t n, const KvSlotPtrs& slot,
                     int64_t old_rows, int64_t kept_after_drop, const float* q, const float* k,
                     const float* v, float* out, cudaStream_t stream);

// Keys of positions [0, j_end) a list cache keeps after query position i (KeyMask::Kept; closed
// form, no loop over j): the row of a kept position p is CountKept(mask, i, p).
constexpr int64_t CountKept(const KeyMask& mask, int64_t i, int64_t j_end) {
  const int64_t end = j_end < i + 1 ? j_end : i + 1;  // causal
  if (end <= 0) return 0;
  switch (mask.kind) {
    case KeyMask::Kind::kCausal:
    case KeyMask::Kind::kStrided:  // every key stays reachable by a later query
      return end;
    case KeyMask::Kind::kWindow: {
      const int64_t first = i - mask.window + 1 > 0 ? i - mask.window + 1 : 0;
      return end > first ? end - first : 0;
    }
    case KeyMask::Kind::kFixed: {
      const int64_t chunk_start = i / mask.chunk * mask.chunk;
      const int64_t same = end > chunk_start ? end - chunk_start : 0;
      const int64_t x = end < chunk_start ? end : chunk_start;  // earlier chunks: [0, x)
      const int64_t first_summary = mask.chunk - mask.summary;
      const int64_t partial = x % mask.chunk > first_summary ? x % mask.chunk - first_summary : 0;
      return same + x / mask.chunk * mask.summary + partial;
    }
  }
  return end;
}

// Rows a decode query at position t attends to after its step's append (LaunchKvDecode's
// new_rows): ring: min(t + 1, capacity); list: the kept rows KeptAfter(t + 1), or under kStrided
// only the ones it sees, NumVisible(t).
constexpr int64_t DecodeAttendedRows(const KeyMask& mask, bool ring, int64_t capacity, int64_t t) {
  if (ring) return t + 1 < capacity ? t + 1 : capacity;
  return mask.kind == KeyMask::Kind::kStrided ? mask.NumVisible(t) : mask.KeptAfter(t + 1);
}

}  // namespace ps::kernels::cuda

#endif  // POLYSKETCH_KERNELS_CUDA_KERNELS_H_
