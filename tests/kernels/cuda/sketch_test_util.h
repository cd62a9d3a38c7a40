// What the CUDA kernel tests (cuda_backend_test.cc on a GPU or the emulated backend, and the
// emulator's own kernels_emulation_test.cc) share: random inputs, and a polysketch state or a KV
// cache holding `start` random tokens built by the CPU backend, the reference every GPU result is
// compared to. Header-only, test code.
#ifndef POLYSKETCH_TESTS_KERNELS_CUDA_SKETCH_TEST_UTIL_H_
#define POLYSKETCH_TESTS_KERNELS_CUDA_SKETCH_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/packed_index.h"

namespace ps::kernels::cuda::test {

// n uniform values in [-scale, scale], the same for the same seed.
inline std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// Per-token inputs of n rows: psi_q, psi_k [n, H, r], v, q~, k~ [n, H, h].
struct SketchInputs {
  std::vector<float> psi_q, psi_k, v, ql, kl;
  SketchInputs(const SketchAttentionShape& sh, int64_t n, uint32_t seed)
      : psi_q(Random(n * sh.heads * sh.sketch_size, seed)),
        psi_k(Random(n * sh.heads * sh.sketch_size, seed + 1)),
        v(Random(n * sh.heads * sh.head_dim, seed + 2)),
        ql(Random(n * sh.heads * sh.head_dim, seed + 3, 0.5f)),
        kl(Random(n * sh.heads * sh.head_dim, seed + 4, 0.5f)) {}
};

// One sequence's polysketch state in host memory (the CPU backend's layout).
struct HostSketchState {
  // s [H, P, h+1]; sketched [H, b, r] (psi(k) of the block), keys, values [H, b, h]:
  // local_exact only.
  std::vector<float> s, sketched, keys, values;
  int64_t pending = 0;  // local_exact: rows of the previous block not yet folded into s
  SketchSlotState Slot() {
    return {s.data(), sketched.empty() ? nullptr : sketched.data(),
            keys.empty() ? nullptr : keys.data(), values.empty() ? nullptr : values.data(),
            sketched.empty() ? nullptr : &pending};
  }
};

// A state of shape `sh` holding `start` random tokens (seeded), prefilled by the CPU backend.
inline HostSketchState MakeHostSketchState(cpu::CpuBackend& cpu, const SketchAttentionShape& sh,
                                           int64_t start, uint32_t seed) {
  HostSketchState st;
  const int64_t state = sh.heads * PackedSymmetricRows(sh.sketch_size) * (sh.head_dim + 1);
  st.s.assign(state, 0.0f);
  if (sh.local_exact) {
    st.sketched.assign(sh.heads * sh.block_size * sh.sketch_size, 0.0f);
    st.keys.assign(sh.heads * sh.block_size * sh.head_dim, 0.0f);
    st.values.assign(st.keys.size(), 0.0f);
  }
  if (start > 0) {
    SketchInputs in(sh, start, seed);
    std::vector<float> out(start * sh.heads * sh.head_dim);
    cpu.SketchPrefill(sh, 0, start, st.Slot(), in.psi_q.data(), in.psi_k.data(), in.v.data(),
                      sh.local_exact ? in.ql.data() : nullptr,
                      sh.local_exact ? in.kl.data() : nullptr, out.data());
  }
  return st;
}

// st.s with the rows a lazy CPU decode left pending folded in: the S of an eager fold (what the
// GPU, which folds every pending row at once, holds), to compare the two. Packed rows in order.
inline std::vector<float> FoldedS(const SketchAttentionShape& sh, const HostSketchState& st) {
  std::vector<float> s = st.s;
  const int64_t h = sh.head_dim, r = sh.sketch_size, b = sh.block_size, cols = h + 1;
  const int64_t P = PackedSymmetricRows(r);
  for (int64_t head = 0; head < sh.heads && st.pending > 0; ++head) {
    for (int64_t j = b - st.pending; j < b; ++j) {
      const float* psi = st.sketched.data() + (head * b + j) * r;
      const float* v = st.values.data() + (head * b + j) * h;
      int64_t p = 0;
      for (int64_t a = 0; a < r; ++a) {
        for (int64_t c = a; c < r; ++c, ++p) {
          const float w = psi[a] * psi[c];
          float* row = s.data() + (head * P + p) * cols;
          for (int64_t d = 0; d < h; ++d) row[d] += w * v[d];
          row[h] += w;
        }
      }
    }
  }
  return s;
}

// A local_exact state at position `start` (> b) whose last `decoded` tokens the CPU backend fed
// one decode step at a time, so that the rows of the previous block it folds lazily are still
// pending when that crosses a block start (st.pending > 0 for b above 8 and a start just past
// the block start).
inline HostSketchState MakeLazyHostSketchState(cpu::CpuBackend& cpu, const SketchAttentionShape& sh,
                                               int64_t start, int64_t decoded, uint32_t seed) {
  HostSketchState st = MakeHostSketchState(cpu, sh, start - decoded, seed);
  SketchInputs in(sh, decoded, seed + 100);
  const int64_t rH = sh.heads * sh.sketch_size, hH = sh.heads * sh.head_dim;
  std::vector<float> out(hH);
  const SketchSlotState slot = st.Slot();
  for (int64_t i = 0; i < decoded; ++i) {
    const int64_t position = start - decoded + i;
    cpu.SketchDecode(sh, {&position, 1}, {&slot, 1}, in.psi_q.data() + i * rH,
                     in.psi_k.data() + i * rH, in.v.data() + i * hH, in.ql.data() + i * hH,
                     in.kl.data() + i * hH, out.data());
  }
  return st;
}

// One sequence's KV cache in host memory (the CPU backend's layout).
struct HostKvState {
  std::vector<float> keys, values;  // [capacity, H, h]
  std::vector<int64_t> positions;   // [capacity]
  int64_t count = 0;
  KvSlotState Slot() { return {keys.data(), values.data(), positions.data(), &count}; }
};

// A KV cache of shape `sh` holding `start` random tokens (seeded), prefilled by the CPU backend.
inline HostKvState MakeHostKvState(cpu::CpuBackend& cpu, const KvAttentionShape& sh, int64_t start,
                                   uint32_t seed) {
  HostKvState st;
  const int64_t row = sh.heads * sh.head_dim;
  st.keys.assign(sh.capacity * row, 0.0f);
  st.values.assign(sh.capacity * row, 0.0f);
  st.positions.assign(sh.capacity, 0);
  if (start > 0) {
    const std::vector<float> q = Random(start * row, seed), k = Random(start * row, seed + 1),
                             v = Random(start * row, seed + 2);
    std::vector<float> out(start * row);
    cpu.KvPrefill(sh, 0, start, st.Slot(), q.data(), k.data(), v.data(), out.data());
  }
  return st;
}

}  // namespace ps::kernels::cuda::test

#endif  // POLYSKETCH_TESTS_KERNELS_CUDA_SKETCH_TEST_UTIL_H_
