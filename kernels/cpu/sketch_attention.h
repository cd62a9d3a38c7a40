// Polysketch attention on the CPU: the decode recurrence (algorithm.md section 4) and the prefill
// block algorithm (section 3) over the packed symmetric state of kernels/packed_index.h. These are
// the CPU backend's SketchDecode / SketchPrefill (kernels/backend.h documents the contract); they
// take the backend's thread pool explicitly so they can be tested and benchmarked on their own.
//
// Shape letters (algorithm.md): B sequences of a decode call, H heads, h head width, r sketch
// size, P = r(r+1)/2 packed rows, b block size, n tokens of a prefill, cols = h + 1 (values and
// the normaliser column).
#ifndef POLYSKETCH_KERNELS_CPU_SKETCH_ATTENTION_H_
#define POLYSKETCH_KERNELS_CPU_SKETCH_ATTENTION_H_

#include <cstdint>

#include <absl/types/span.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {

// One decode step for B = positions.size() sequences (Backend::SketchDecode): sequence i feeds the
// token at positions[i] into slots[i], update first, then readout. With shape.local_exact a block
// is folded into S lazily: when positions[i] % b == 0 and > 0 the whole buffer (the completed
// block) becomes pending, and each step folds the next 8 pending rows (S += phi(psi(K))^T [V | 1]
// over those rows, a [P, 8] x [8, h+1] GEMM per head), so a block is folded over its successor's
// first b / 8 steps; the step then writes (psi(k), k~, v) to buffer row positions[i] % b (never a
// pending row) and adds to the readout of S the exact (q~ . k~_j)^4 weights of buffer rows
// 0 .. positions[i] % b and the (psi_q . psi_k_j)^2 weights of the rows still pending, which it
// leaves in *slots[i].local_pending.
//   psi_q, psi_k: [B, H, r]; v, out: [B, H, h]; q_local, k_local: [B, H, h] or null (plain).
//   slots[i].sketch: [H, P, h+1]; local_sketch: [H, b, r]; local_keys / local_values: [H, b, h].
// Every slot must be distinct. Memory-bound: per (sequence, head) it reads S once and writes S
// (plain), or only reads S plus the buffer rows of the block (local_exact; a step that folds
// also writes S once and reads the pending rows). Numerics: fp32 throughout.
// Threads: ParallelFor over (sequence, head) pairs, splitting the P rows of a head across threads
// when there are fewer pairs than threads. Engine thread only (one call on `pool` at a time).
void SketchDecode(ThreadPool& pool, const SketchAttentionShape& shape,
                  absl::Span<const int64_t> positions, absl::Span<const SketchSlotState> slots,
                  const float* psi_q, const float* psi_k, const float* v, const float* q_local,
                  const float* k_local, float* out);

// Prefill of n tokens of one sequence at positions start .. start+n-1 (Backend::SketchPrefill):
// the block algorithm, tile by tile. With local_exact the tiles are the trained blocks aligned to
// position 0 (the first and last tile may be partial); without, tiles of block_size (256 when 0)
// tokens from `start`. Outputs and the final state (S, buffer) equal n SketchDecode steps up to
// fp32 rounding, for any start and n, except that a prefill first folds the rows a decode left
// pending and leaves none (its S is decode's plus the rows decode would still hold pending); a
// block that ends with the prefill stays in the full buffer until the next token, as in decode.
//   psi_q, psi_k: [n, H, r]; v, out: [n, H, h]; q_local, k_local: [n, H, h] or null (plain).
// Work per tile and head: two GEMMs with inner or outer dimension P ([tile, P] x [P, h+1] readout
// against the state before the tile, [P, b or tile] x [b or tile, h+1] fold: local_exact folds
// the previous block at a block start, plain the tile itself) plus the causal intra-tile part.
// Threads: per tile, ParallelFor over (head, state rows) and then (head, query rows).
void SketchPrefill(ThreadPool& pool, const SketchAttentionShape& shape, int64_t start, int64_t n,
                   const SketchSlotState& slot, const float* psi_q, const float* psi_k,
                   const float* v, const float* q_local, const float* k_local, float* out);

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_SKETCH_ATTENTION_H_
