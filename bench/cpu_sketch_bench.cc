// Microbenchmarks of kernels/cpu/sketch_attention.h at one layer of three shapes: the GPT-2-small
// shape plain (H = 12, h = 64, r = 32), the tiny model (H = 3, h = 64, r = 32, b = 128,
// local_exact) and the GPT-2-small shape with local_exact (b = 256, as polysketch-bench's
// gpt2-small-polysketch). Never asserts.
//   Decode is memory-bound on the state, P = r(r+1)/2 = 528 rows of h+1 floats per head; bytes per
//   (sequence, head) and step (DecodeTrafficBytes):
//     plain: 2 P (h+1) 4 (read S, write S);
//     local_exact: P (h+1) 4 (read S) + (m+1) 2 h 4 (buffer rows read) + (r + 2h) 4 (row written),
//       m = position % b; in the first b / 8 steps of a block (the lazy fold) S is also written,
//       and the previous block's rows still pending are read, (r + h) 4 each: the 8 the step
//       folds (2 P (h+1) 8 flops) and the rest, read out exactly; at a block start (step=1, m = 0)
//       that is the whole buffer;
//     local_exact with S_cur (kernel=1, the layout before issue 19, bench/legacy_sketch_decode.h):
//       3 P (h+1) 4 (read S, read and write S_cur) + the buffer rows; 4 P (h+1) 4 at a block start.
//   step=2 runs a whole block, b steps from a block start, and reports the mean step (bytes: the
//   mean of the above over the block): what a stream of tokens costs, spikes included.
//   Compare its bytes/s with BM_StreamRoofline (the same reads and writes without the arithmetic)
//   and BM_Memcpy of the same traffic (memcpy of half of it: read + write; a cold memcpy also pays
//   the write-allocate reads of its destination, the decode does not).
//   ws_mib = 0 reuses one state (cache-resident when small); ws_mib > 0 rotates over copies
//   totalling that much memory, like successive layers, so the state comes from DRAM (use a
//   working set well above the L3). Prefill flops per head = 2 n P (h+1) (readout) + 2 n P (h+1)
//   (fold) + intra-tile part.
//   --threads=N (or PS_BENCH_THREADS) sizes the pool; default hardware_concurrency.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench/bench_util.h"
#include "bench/legacy_sketch_decode.h"
#include "kernels/backend.h"
#include "kernels/cpu/sketch_attention.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/packed_index.h"

namespace ps::kernels::cpu {
namespace {

using ::ps::bench::Pool;
using ::ps::bench::RandomNormal;

// 0: GPT-2-small plain; 1: tiny local_exact; 2: GPT-2-small local_exact.
SketchAttentionShape Shape(int64_t id) {
  SketchAttentionShape shape;
  shape.heads = id == 1 ? 3 : 12;
  shape.head_dim = 64;
  shape.sketch_size = 32;
  shape.local_exact = id != 0;
  shape.block_size = id == 0 ? 0 : (id == 1 ? 128 : 256);
  return shape;
}

// The states of B sequences for one layer, in one allocation per component: the current layout,
// or (legacy) the one with S_cur.
struct LayerStates {
  std::vector<float> sketch, sketched, sketch_cur, keys, values;
  std::vector<int64_t> pending;  // local_exact: each sequence's lazy-fold count
  std::vector<SketchSlotState> slots;
  std::vector<bench::legacy::SlotState> legacy_slots;

  LayerStates(const SketchAttentionShape& shape, int64_t B, bool legacy) {
    const int64_t head_state = PackedSymmetricRows(shape.sketch_size) * (shape.head_dim + 1);
    const int64_t per_seq = shape.heads * head_state;
    const int64_t buffer = shape.heads * shape.block_size * shape.head_dim;
    const int64_t sketched_rows = shape.heads * shape.block_size * shape.sketch_size;
    sketch.assign(B * per_seq, 0.0f);
    pending.assign(B, 0);
    if (shape.local_exact) {
      if (legacy) {
        sketch_cur.assign(B * per_seq, 0.0f);
      } else {
        sketched = RandomNormal(B * sketched_rows, 13);
      }
      keys = RandomNormal(B * buffer, 11);
      values = RandomNormal(B * buffer, 12);
    }
    for (int64_t i = 0; i < B; ++i) {
      SketchSlotState slot;
      bench::legacy::SlotState old;
      slot.sketch = old.sketch = sketch.data() + i * per_seq;
      if (shape.local_exact) {
        slot.local_keys = old.local_keys = keys.data() + i * buffer;
        slot.local_values = old.local_values = values.data() + i * buffer;
        if (legacy) {
          old.sketch_cur = sketch_cur.data() + i * per_seq;
        } else {
          slot.local_sketch = sketched.data() + i * sketched_rows;
          slot.local_pending = &pending[i];
        }
      }
      slots.push_back(slot);
      legacy_slots.push_back(old);
    }
  }
};

// Copies of a layer needed to reach ws_mib MiB (1 when ws_mib is 0).
int64_t Copies(int64_t bytes_per_copy, int64_t ws_mib) {
  return std::max<int64_t>(1, (ws_mib << 20) / std::max<int64_t>(1, bytes_per_copy));
}

// The decode position: mid-block for local_exact (m = 64: 65 buffer rows read), or (fold) the
// first token of block 9, which folds block 8; any position for plain.
int64_t DecodePosition(const SketchAttentionShape& shape, bool fold) {
  const int64_t b = shape.block_size > 0 ? shape.block_size : 128;
  return fold ? 9 * b : 8 * b + 64;
}

// Bytes of one layer's state for B sequences (what a ws_mib working set is made of).
int64_t StateBytes(const SketchAttentionShape& shape, int64_t B, bool legacy) {
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size, b = shape.block_size;
  const int64_t s = H * PackedSymmetricRows(r) * (h + 1) * 4;
  if (!shape.local_exact) return B * s;
  return B * (s * (legacy ? 2 : 1) + H * b * (2 * h + (legacy ? 0 : r)) * 4);
}

// The napkin formula of the file comment for one local_exact step at m = position % b (the
// pending rows as a run from the block start leaves them: b - 8 m before the step).
int64_t LocalStepBytesPerHead(const SketchAttentionShape& shape, int64_t m, bool legacy) {
  const int64_t h = shape.head_dim, r = shape.sketch_size, b = shape.block_size;
  const int64_t head_state_bytes = PackedSymmetricRows(r) * (h + 1) * 4;
  const int64_t buffer_rows = 2 * (m + 1) * h * 4;
  if (legacy) return (m == 0 ? 4 : 3) * head_state_bytes + buffer_rows;
  const int64_t pending_before = std::max<int64_t>(0, b - 8 * m);
  return (pending_before > 0 ? 2 : 1) * head_state_bytes + buffer_rows + (r + 2 * h) * 4 +
         pending_before * (r + h) * 4;
}

// The napkin formula of the file comment. step: 0 ordinary, 1 block start, 2 mean over a block.
int64_t DecodeTrafficBytes(const SketchAttentionShape& shape, int64_t B, int64_t step,
                           bool legacy) {
  const int64_t h = shape.head_dim, r = shape.sketch_size, b = shape.block_size;
  if (!shape.local_exact) return B * shape.heads * 2 * PackedSymmetricRows(r) * (h + 1) * 4;
  int64_t per_head = 0;
  if (step == 2) {
    for (int64_t m = 0; m < b; ++m) per_head += LocalStepBytesPerHead(shape, m, legacy);
    per_head /= b;
  } else {
    per_head = LocalStepBytesPerHead(shape, DecodePosition(shape, step == 1) % b, legacy);
  }
  return B * shape.heads * per_head;
}

// Args: shape (0 plain, 1 tiny local_exact, 2 GPT-2-small local_exact), B, ws_mib, step (0: an
// ordinary step, 1: the block-start step, the most expensive one, 2: a whole block of b steps,
// timed per step), kernel (0: current, 1: with S_cur).
void BM_SketchDecode(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0));
  const int64_t B = state.range(1);
  const int64_t ws_mib = state.range(2);
  const int64_t step = state.range(3);
  const bool fold = step == 1;
  const bool legacy = state.range(4) != 0;
  if (step == 2 && !shape.local_exact) {
    state.SkipWithError("step=2 (a whole block) is for local_exact layouts");
    return;
  }
  if (legacy && !shape.local_exact) {
    state.SkipWithError("kernel=1 (S_cur) is a local_exact layout");
    return;
  }
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size;
  std::vector<LayerStates> layers;
  const int64_t copies = Copies(StateBytes(shape, B, legacy), ws_mib);
  for (int64_t l = 0; l < copies; ++l) layers.emplace_back(shape, B, legacy);
  const std::vector<float> psi_q = RandomNormal(B * H * r, 1), psi_k = RandomNormal(B * H * r, 2);
  const std::vector<float> v = RandomNormal(B * H * h, 3);
  const std::vector<float> q_local = RandomNormal(B * H * h, 4),
                           k_local = RandomNormal(B * H * h, 5);
  std::vector<float> out(B * H * h);
  std::vector<int64_t> positions(B, DecodePosition(shape, fold));
  const float* ql = shape.local_exact ? q_local.data() : nullptr;
  const float* kl = shape.local_exact ? k_local.data() : nullptr;
  auto decode = [&](LayerStates& states) {
    if (legacy) {
      bench::legacy::SketchDecode(Pool(), shape, positions, states.legacy_slots, psi_q.data(),
                                  psi_k.data(), v.data(), ql, kl, out.data());
    } else {
      SketchDecode(Pool(), shape, positions, states.slots, psi_q.data(), psi_k.data(), v.data(), ql,
                   kl, out.data());
    }
  };
  // Steps per iteration: one (on the next copy), or (step 2) the b steps of a block from its
  // start on every copy, a position at a time, so that each step's state comes from DRAM too.
  const int64_t steps = step == 2 ? shape.block_size * copies : 1;
  int64_t layer = 0;
  for (auto _ : state) {
    if (step == 2) {
      for (LayerStates& states : layers) std::fill(states.pending.begin(), states.pending.end(), 0);
      for (int64_t i = 0; i < shape.block_size; ++i) {
        std::fill(positions.begin(), positions.end(), DecodePosition(shape, true) + i);
        for (LayerStates& states : layers) decode(states);
      }
    } else {
      // No rows pending before a block start or the ordinary mid-block step (m = 64 is past the
      // lazy fold's first b / 8 steps), as a run from the block start leaves them.
      std::fill(layers[layer].pending.begin(), layers[layer].pending.end(), 0);
      decode(layers[layer]);
      if (++layer == copies) layer = 0;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const int64_t bytes = DecodeTrafficBytes(shape, B, step, legacy);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * steps * bytes);
  state.counters["steps_per_iteration"] = static_cast<double>(steps);
  // Seconds per decode step (the mean over the block for step 2).
  state.counters["s_per_step"] =
      benchmark::Counter(static_cast<double>(state.iterations() * steps),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["bytes_per_step"] = static_cast<double>(bytes);
  state.counters["state_bytes_per_seq"] = static_cast<double>(StateBytes(shape, 1, legacy));
  state.counters["copies"] = static_cast<double>(copies);
  state.counters["threads"] = Pool().num_threads();
}

void DecodeArgs(benchmark::internal::Benchmark* b) {
  for (int64_t B : {1, 8, 32}) {
    for (int64_t ws_mib : {0, 1024}) b->Args({0, B, ws_mib, 0, 0});
  }
  // Issue 19 item 3: local_exact without S_cur (kernel 0) against with it (kernel 1), ordinary
  // and folding steps, tiny and GPT-2-small shapes, batch 1 and 32, state from DRAM.
  // step 2: a whole block, the lazy fold's cost spread over it.
  for (int64_t shape : {1, 2}) {
    for (int64_t B : {1, 32}) {
      for (int64_t step : {0, 1, 2}) {
        for (int64_t kernel : {0, 1}) b->Args({shape, B, 256, step, kernel});
      }
    }
  }
}
BENCHMARK(BM_SketchDecode)
    ->Apply(DecodeArgs)
    ->ArgNames({"shape", "B", "ws_mib", "step", "kernel"})
    ->UseRealTime();

// Args of the bandwidth references: shape, B, ws_mib (the current kernel's ordinary step).
void ReferenceArgs(benchmark::internal::Benchmark* b) {
  for (int64_t shape : {0, 1}) {
    for (int64_t B : {1, 8, 32}) {
      for (int64_t ws_mib : {0, 1024}) b->Args({shape, B, ws_mib});
    }
  }
}

// The copy bandwidth reference: memcpy of half the decode traffic of the same args (read + write
// = the same bytes), over the same working set, on the same pool threads. Args: shape, B, ws_mib.
void BM_Memcpy(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0));
  const int64_t bytes = DecodeTrafficBytes(shape, state.range(1), 0, false) / 2;
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
BENCHMARK(BM_Memcpy)->Apply(ReferenceArgs)->ArgNames({"shape", "B", "ws_mib"})->UseRealTime();

// The roofline of the decode's access pattern without its arithmetic, on the same pool threads
// and working set: plain, S[i] = S[i] * c + 1 in place (read + write); local_exact, a sum of S
// (read only, the ordinary step). Bytes = the state bytes of the same args (without the local
// buffer rows). Args: shape, B, ws_mib.
void BM_StreamRoofline(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0));
  const bool local = shape.local_exact;
  const int64_t B = state.range(1);
  const int64_t floats = B * shape.heads * PackedSymmetricRows(shape.sketch_size) *
                         (shape.head_dim + 1);  // one state array of the layer
  const int64_t copies = Copies(floats * 4, state.range(2));
  std::vector<float> s(copies * floats, 1.0f);
  std::vector<float> sums(Pool().num_threads() * 16, 0.0f);
  int64_t layer = 0;
  for (auto _ : state) {
    const int64_t shares = Pool().num_threads();
    Pool().ParallelFor(shares, 1, [&](int64_t begin, int64_t end) {
      const int64_t lo = layer * floats + floats * begin / shares;
      const int64_t hi = layer * floats + floats * end / shares;
      if (local) {
        const float* __restrict x = s.data();
        float part[16] = {};
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
          for (int l = 0; l < 16; ++l) part[l] += x[i + l];
        }
        for (; i < hi; ++i) part[0] += x[i];
        std::copy(part, part + 16, sums.begin() + begin * 16);
      } else {
        float* __restrict x = s.data();
        for (int64_t i = lo; i < hi; ++i) x[i] = x[i] * 0.5f + 1.0f;
      }
    });
    benchmark::DoNotOptimize(s.data());
    benchmark::ClobberMemory();
    if (++layer == copies) layer = 0;
  }
  benchmark::DoNotOptimize(sums.data());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * floats * 4 * (local ? 1 : 2));
  state.counters["copies"] = static_cast<double>(copies);
}
BENCHMARK(BM_StreamRoofline)
    ->Apply(ReferenceArgs)
    ->ArgNames({"shape", "B", "ws_mib"})
    ->UseRealTime();

// Args: shape (0 plain, 1 tiny local_exact), n. Prefill of n tokens from position 0 of one
// sequence.
void BM_SketchPrefill(benchmark::State& state) {
  const SketchAttentionShape shape = Shape(state.range(0));
  const int64_t n = state.range(1);
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size;
  LayerStates layer(shape, 1, false);
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
    ->ArgNames({"shape", "n"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace ps::kernels::cpu

int main(int argc, char** argv) { return ps::bench::RunBenchmarks(argc, argv); }
