// The local_exact decode step with S_cur, as it was before issue 19 item 3: benchmark-only, so
// that bench/cpu_sketch_bench.cc measures before and after in one run (legacy_sketch_decode.cc
// says more). Same contract as kernels/cpu/sketch_attention.h SketchDecode of that time.
#ifndef POLYSKETCH_BENCH_LEGACY_SKETCH_DECODE_H_
#define POLYSKETCH_BENCH_LEGACY_SKETCH_DECODE_H_

#include <cstdint>

#include <absl/types/span.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::bench::legacy {

// One sequence's state for one layer in the former layout.
struct SlotState {
  float* sketch = nullptr;        // [H, P, h+1]: S_prev
  float* sketch_cur = nullptr;    // [H, P, h+1]: S_cur, the running sum of the current block
  float* local_keys = nullptr;    // [H, b, h]: k~ of the current block
  float* local_values = nullptr;  // [H, b, h]: v of the current block
};

// One decode step for B = positions.size() sequences: at positions[i] % b == 0 and > 0,
// S += S_cur and S_cur = 0 first; then S_cur += phi(psi(k)) [v; 1]^T, (k~, v) into buffer row
// positions[i] % b, and out = the readout of S plus the exact local part. psi_q, psi_k [B, H, r];
// v, q_local, k_local, out [B, H, h]. shape.local_exact must be true.
void SketchDecode(kernels::cpu::ThreadPool& pool, const kernels::SketchAttentionShape& shape,
                  absl::Span<const int64_t> positions, absl::Span<const SlotState> slots,
                  const float* psi_q, const float* psi_k, const float* v, const float* q_local,
                  const float* k_local, float* out);

}  // namespace ps::bench::legacy

#endif  // POLYSKETCH_BENCH_LEGACY_SKETCH_DECODE_H_
