// Microbenchmarks of kernels/cpu/sketch_attention.h at one layer of the GPT-2-small shape (H = 12,
// h = 64, r = 32, plain) and of the tiny model (H = 3, h = 64, r = 32, b = 128, local_exact).
// Never asserts.
//   Decode is memory-bound on the state: bytes per step = B H P (h+1) 4 x 2 (plain: read S, write
//   S) or x 3 (local_exact: read S, read and write S_cur) plus the local buffer rows read,
//   P = r(r+1)/2 = 528. Compare its bytes/s with BM_StreamRoofline (the same reads and writes
//   without the arithmetic) and BM_Memcpy of the same traffic (memcpy of half of it: read + write;
//   a cold memcpy also pays the write-allocate reads of its destination, the decode does not).
//   ws_mib = 0 reuses one state (cache-resident when small); ws_mib > 0 rotates over copies
//   totalling that much memory, like successive layers, so the state comes from DRAM (this
//   machine's L3 is large: use a working set well above it). Prefill flops per head = 2 n P (h+1)
//   (readout) + 2 n P (h+1) (fold) + intra-tile part.
//   --threads=N (or PS_BENCH_THREADS) sizes the pool; default hardware_concurrency.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench/bench_util.h"
#include "kernels/backend.h"
#include "kernels/cpu/sketch_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/packed_index.h"

namespace ps::kernels::cpu {
namespace {

using ::ps::bench::Pool;
using ::ps::bench::RandomNormal;

SketchAttentionShape Shape(bool local) {
  SketchAttentionShape shape;
  shape.heads = local ? 3 : 12;
  shape.head_dim = 64;
  shape.sketch_size = 32;
  shape.local_exact = local;
  shape.block_size = local ? 128 : 0;
  return shape;
}

// The states of B sequences for one layer, in one allocation.
struct LayerStates {
  std::vector<float> sketch, sketch_cur, keys, values;
  std::vector<SketchSlotState> slots;

  LayerStates(const SketchAttentionShape& shape, int64_t B) {
    const int64_t head_state = PackedSymmetricRows(shape.sketch_size) * (shape.head_dim + 1);
    const int64_t per_seq = shape.heads * head_state;
    const int64_t buffer = shape.heads * shape.block_size * shape.head_dim;
    sketch.assign(B * per_seq, 0.0f);
    if (shape.local_exact) {
      sketch_cur.assign(B * per_seq, 0.0f);
      keys = RandomNormal(B * buffer, 11);
      values = RandomNormal(B * buffer, 12);
    }
    for (int64_t i = 0; i < B; ++i) {
      SketchSlotState slot;
      slot.sketch = sketch.data() + i * per_seq;
      if (shape.local_exact) {
        slot.sketch_cur = sketch_cur.data() + i * per_seq;
        slot.local_keys = keys.data() + i * buffer;
        slot.local_values = values.data() + i * buffer;
      }
      slots.push_back(slot);
    }
  }
};

// Copies of a layer needed to reach ws_mib MiB (1 when ws_mib is 0).
int64_t Copies(int64_t bytes_per_copy, int64_t ws_mib) {
  return std::max<int64_t>(1, (ws_mib << 20) / std::max<int64_t>(1, bytes_per_copy));
}

// Mid-block position for local_exact (65 buffer rows read); any position for plain.
constexpr int64_t kDecodePosition = 128 * 8 + 64;

int64_t DecodeTrafficBytes(const SketchAttentionShape& shape, int64_t B) {
  const int64_t head_state_bytes =
      PackedSymmetricRows(shape.sketch_size) * (shape.head_dim + 1) * 4;
  const int64_t per_head =
      shape.local_exact
          ? 3 * head_state_bytes + 2 * (kDecodePosition % shape.block_size + 1) * shape.head_dim * 4
          : 2 * head_state_bytes;
  return B * shape.heads * per_head;
}

// Args: local (0/1), B, ws_mib.
void BM_SketchDecode(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0) != 0);
  const int64_t B = state.range(1);
  const int64_t ws_mib = state.range(2);
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size;
  const int64_t state_bytes =
      B * H * PackedSymmetricRows(r) * (h + 1) * 4 * (shape.local_exact ? 2 : 1);
  std::vector<LayerStates> layers;
  const int64_t copies = Copies(state_bytes, ws_mib);
  for (int64_t l = 0; l < copies; ++l) layers.emplace_back(shape, B);
  const std::vector<float> psi_q = RandomNormal(B * H * r, 1), psi_k = RandomNormal(B * H * r, 2);
  const std::vector<float> v = RandomNormal(B * H * h, 3);
  const std::vector<float> q_local = RandomNormal(B * H * h, 4),
                           k_local = RandomNormal(B * H * h, 5);
  std::vector<float> out(B * H * h);
  const std::vector<int64_t> positions(B, kDecodePosition);
  const float* ql = shape.local_exact ? q_local.data() : nullptr;
  const float* kl = shape.local_exact ? k_local.data() : nullptr;
  int64_t layer = 0;
  for (auto _ : state) {
    SketchDecode(Pool(), shape, positions, layers[layer].slots, psi_q.data(), psi_k.data(),
                 v.data(), ql, kl, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    if (++layer == copies) layer = 0;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * DecodeTrafficBytes(shape, B));
  state.counters["copies"] = static_cast<double>(copies);
  state.counters["threads"] = Pool().num_threads();
}

void DecodeArgs(benchmark::internal::Benchmark* b) {
  for (int64_t local : {0, 1}) {
    for (int64_t B : {1, 8, 32}) {
      for (int64_t ws_mib : {0, 1024}) b->Args({local, B, ws_mib});
    }
  }
}
BENCHMARK(BM_SketchDecode)->Apply(DecodeArgs)->ArgNames({"local", "B", "ws_mib"})->UseRealTime();

// The copy bandwidth reference: memcpy of half the decode traffic of the same args (read + write
// = the same bytes), over the same working set, on the same pool threads. Args: local (0/1), B,
// ws_mib.
void BM_Memcpy(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0) != 0);
  const int64_t bytes = DecodeTrafficBytes(shape, state.range(1)) / 2;
  const int64_t copies = Copies(2 * bytes, state.range(2));
  std::vector<char> src(copies * bytes, 1), dst(copies * bytes, 0);
  int64_t layer = 0;
  for (auto _ : state) {
    // Split like the decode: one contiguous share per pool thread.
    const int64_t shares = Pool().num_threads();
    Pool().ParallelFor(shares, 1, [&](int64_t begin, int64_t end) {
      const int64_t lo = bytes * begin / shares, hi = bytes * end / shares;
      std::memcpy(dst.data() + layer * bytes + lo, src.data() + layer * bytes + lo, hi - lo);
    });
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
    if (++layer == copies) layer = 0;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * bytes);
  state.counters["copies"] = static_cast<double>(copies);
}
BENCHMARK(BM_Memcpy)->Apply(DecodeArgs)->ArgNames({"local", "B", "ws_mib"})->UseRealTime();

// The roofline of the decode's access pattern without its arithmetic, on the same pool threads
// and working set: plain, S[i] = S[i] * c + 1 in place (read + write); local_exact,
// S_cur[i] += S[i] (read, read + write). Bytes = the decode traffic of the same args (less its
// small local-buffer reads). Args: local (0/1), B, ws_mib.
void BM_StreamRoofline(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0) != 0);
  const bool local = shape.local_exact;
  const int64_t B = state.range(1);
  const int64_t floats = B * shape.heads * PackedSymmetricRows(shape.sketch_size) *
                         (shape.head_dim + 1);  // one state array of the layer
  const int64_t copies = Copies(floats * 4 * (local ? 2 : 1), state.range(2));
  std::vector<float> s(copies * floats, 1.0f), s_cur(local ? copies * floats : 0, 0.0f);
  int64_t layer = 0;
  for (auto _ : state) {
    const int64_t shares = Pool().num_threads();
    Pool().ParallelFor(shares, 1, [&](int64_t begin, int64_t end) {
      const int64_t lo = layer * floats + floats * begin / shares;
      const int64_t hi = layer * floats + floats * end / shares;
      if (local) {
        float* __restrict y = s_cur.data();
        const float* __restrict x = s.data();
        for (int64_t i = lo; i < hi; ++i) y[i] += x[i];
      } else {
        float* __restrict x = s.data();
        for (int64_t i = lo; i < hi; ++i) x[i] = x[i] * 0.5f + 1.0f;
      }
    });
    benchmark::DoNotOptimize(s.data());
    benchmark::ClobberMemory();
    if (++layer == copies) layer = 0;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * floats * 4 * (local ? 3 : 2));
  state.counters["copies"] = static_cast<double>(copies);
}
BENCHMARK(BM_StreamRoofline)->Apply(DecodeArgs)->ArgNames({"local", "B", "ws_mib"})->UseRealTime();

// Args: local (0/1), n. Prefill of n tokens from position 0 of one sequence.
void BM_SketchPrefill(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0) != 0);
  const int64_t n = state.range(1);
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size;
  LayerStates layer(shape, 1);
  const std::vector<float> psi_q = RandomNormal(n * H * r, 1), psi_k = RandomNormal(n * H * r, 2);
  const std::vector<float> v = RandomNormal(n * H * h, 3);
  const std::vector<float> q_local = RandomNormal(n * H * h, 4),
                           k_local = RandomNormal(n * H * h, 5);
  std::vector<float> out(n * H * h);
  for (auto _ : state) {
    SketchPrefill(Pool(), shape, 0, n, layer.slots[0], psi_q.data(), psi_k.data(), v.data(),
                  shape.local_exact ? q_local.data() : nullptr,
                  shape.local_exact ? k_local.data() : nullptr, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const int64_t tile = shape.block_size > 0 ? shape.block_size : 256;
  const int64_t P = PackedSymmetricRows(r);
  const double intra_width = shape.local_exact ? h : r;
  const double flops =
      H * (4.0 * n * P * (h + 1) + n * (tile + 1) / 2.0 * 2.0 * (intra_width + h + 1));
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n) * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["threads"] = Pool().num_threads();
}
BENCHMARK(BM_SketchPrefill)
    ->Args({0, 4096})
    ->Args({1, 4096})
    ->ArgNames({"local", "n"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace ps::kernels::cpu

int main(int argc, char** argv) { return ps::bench::RunBenchmarks(argc, argv); }
