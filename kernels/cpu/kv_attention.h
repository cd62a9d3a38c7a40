// KV-cache attention on the CPU (algorithm.md section 2): softmax and exact polynomial weights
// over a list cache of kept keys (softmax, polynomial, sparse_strided, sparse_fixed) or a ring of
// the last w keys (sliding_window). The softmax baseline the polysketch kernels are compared
// against, so it is flash-style: one pass over the keys with an online softmax, never an n x n
// score matrix. The CpuBackend's KvDecode / KvPrefill forward here (kernels/backend.h documents
// the semantics; the engine's ReferenceModel::AttendKv is the scalar decode these must match).
//
// Shape letters: B sequences of a decode call, H heads, h head width, n prefill tokens, w window.
#ifndef POLYSKETCH_KERNELS_CPU_KV_ATTENTION_H_
#define POLYSKETCH_KERNELS_CPU_KV_ATTENTION_H_

#include <cstdint>

#include <absl/types/span.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {

// One decode step for B = positions.size() == slots.size() sequences. Sequence b appends its key
// and value (rows b of k, v) at position positions[b] to slots[b], drops the cached rows that
// neither that position nor a later one sees (list caches, shape.mask.Kept; kept rows stay in
// position order), then attends over the kept rows that position sees (shape.mask.Visible; all of
// them except under sparse_strided, whose list cache keeps every key and whose query walks only
// its window + t / stride visible rows). q, k, v, out: [B, H, h] fp32 (k post-RoPE, unrotated for
// "local_rope" models; kPolynomial: q, k already qk-normalised). Cache rows are [H, h]:
// keys[row * H * h + head * h + i].
//   list (shape.ring false): rows 0 .. *count-1 hold positions[row] ascending; *count never
//     exceeds shape.capacity (the engine sizes it with mask.MaxKept; checked by assert).
//   ring (shape.ring true, capacity == window w): position t is row t % w, *count is the tokens
//     written so far (== t before the step), slot.positions is unused (may be null).
// Work: (sequence, head, key range) items on `pool`, each one pass with an online softmax; long
// caches are split over several items (flash-decoding) and the partial results merged.
// Numerics: fp32 dot products and sums; softmax weights exp(q.k / sqrt(h) - max); polynomial
// weights (q.k)^4 as (x*x)*(x*x), out = sum w v / (1 + sum w) with the 1 exact.
// shape.cache_dtype kFp16: the cache rows are slot.keys_f16 / values_f16 (binary16 bits, same
// [row, H, h] layout); k and v are rounded to nearest even when stored, and attention reads the
// rounded values (widened to fp32 exactly), the current token's included.
void KvDecode(ThreadPool& pool, const KvAttentionShape& shape, absl::Span<const int64_t> positions,
              absl::Span<const KvSlotState> slots, const float* q, const float* k, const float* v,
              float* out);

// Prefill of n >= 0 tokens of one sequence at positions start .. start+n-1; the cache holds what
// it holds after position start-1 (ring: *count == start). Query i attends to the cached rows it
// sees and to the new tokens j in [start, i] with shape.mask.Visible(i, j). All outputs are
// computed first (tiles of queries x keys, online softmax), then the cache is updated: list: rows
// not Kept(start+n-1, .) are dropped and the new tokens it keeps appended; ring: the last min(n, w)
// tokens are written, *count += n. Outputs and final cache equal n KvDecode steps up to rounding
// (the cache contents exactly). q, k, v, out: [n, H, h]. Work: (head, query tile) items.
void KvPrefill(ThreadPool& pool, const KvAttentionShape& shape, int64_t start, int64_t n,
               const KvSlotState& slot, const float* q, const float* k, const float* v, float* out);

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_KV_ATTENTION_H_
