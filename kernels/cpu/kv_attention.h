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
#include <vector>

#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {

// The inner loops of KvDecode's attention pass.
//   kPortable: GCC vector types under the file's flags, any h. An fp16 cache is widened a tile of
//     64 rows at a time into an L1 block (half_convert.h) before the fp32 loops read it.
//   kAvx512: AVX-512F intrinsics chosen at run time, for h a multiple of 16 up to 128 (others run
//     the portable loops): rows are loaded (fp16: widened by vcvtph2ps) straight into registers,
//     the scores of 16 keys reduced together, q and the output accumulators kept in registers.
enum class KvDecodePath { kPortable, kAvx512 };
absl::string_view KvDecodePathName(KvDecodePath path);  // "portable", "avx512"
// The paths this CPU runs: kPortable always, kAvx512 where cpuid reports AVX-512F.
std::vector<KvDecodePath> SupportedKvDecodePaths();
// The fastest supported path (the last of SupportedKvDecodePaths): what the backend runs.
KvDecodePath BestKvDecodePath();

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
// `path` picks the inner loops of the attention pass (KvDecodePath below); every path gives the
// same results up to fp32 rounding (the order of the sums differs).
void KvDecode(ThreadPool& pool, const KvAttentionShape& shape, absl::Span<const int64_t> positions,
              absl::Span<const KvSlotState> slots, const float* q, const float* k, const float* v,
              float* out, KvDecodePath path = BestKvDecodePath());

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
