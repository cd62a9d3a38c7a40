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
  SketchSlotState Slot() {
    return {s.data(), sketched.empty() ? nullptr : sketched.data(),
            keys.empty() ? nullptr : keys.data(), values.empty() ? nullptr : values.data()};
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
