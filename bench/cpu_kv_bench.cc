// Microbenchmarks of the softmax baseline's KV-cache decode (kernels/cpu/kv_attention.h) on the
// GPT-2-small shape (H = 12 heads of h = 64, causal list cache), batch 1, at a given context.
// Never asserts.
//   One decode step reads every cached key and value of the layer once:
//     bytes = 2 * context * H * h * (4 for fp32 caches, 2 for fp16),
//   and does 2 * 2 * context * H * h flops (q.k and p v). That stream is what the step is bound by
//   at long contexts, so bytes/s is the figure to compare with BM_KvStream, a plain read of the
//   same bytes (a vectorised sum, no arithmetic of interest) over the same layer copies.
//   layers > 1 rotates over that many caches (like the model's successive layers), so that a
//   step's cache comes from DRAM once the layers together exceed the L3.
//   --threads=N (or PS_BENCH_THREADS) sizes the pool; default hardware_concurrency.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench/bench_util.h"
#include "kernels/backend.h"
#include "kernels/cpu/half_convert.h"
#include "kernels/cpu/kv_attention.h"
#include "kernels/cpu/thread_pool.h"

namespace ps::kernels::cpu {
namespace {

using bench::Pool;
using bench::RandomNormal;

constexpr int64_t kHeads = 12;
constexpr int64_t kHeadDim = 64;
constexpr int64_t kRow = kHeads * kHeadDim;

// One layer's cache of `context` rows (plus the row the step appends), filled with N(0, 1).
struct LayerCache {
  std::vector<float> keys, values;
  std::vector<uint16_t> keys_f16, values_f16;
  std::vector<int64_t> positions;
  int64_t count = 0;
};

KvAttentionShape Shape(int64_t context, bool half) {
  KvAttentionShape shape;
  shape.heads = kHeads;
  shape.head_dim = kHeadDim;
  shape.capacity = context + 1;
  shape.cache_dtype = half ? KvCacheDtype::kFp16 : KvCacheDtype::kFp32;
  return shape;
}

std::vector<LayerCache> MakeCaches(int64_t context, bool half, int64_t layers) {
  std::vector<LayerCache> caches(static_cast<size_t>(layers));
  const int64_t size = (context + 1) * kRow;
  for (int64_t l = 0; l < layers; ++l) {
    LayerCache& c = caches[static_cast<size_t>(l)];
    const std::vector<float> k = RandomNormal(size, static_cast<uint32_t>(2 * l + 1));
    const std::vector<float> v = RandomNormal(size, static_cast<uint32_t>(2 * l + 2));
    if (half) {
      c.keys_f16.resize(static_cast<size_t>(size));
      c.values_f16.resize(static_cast<size_t>(size));
      FloatToHalf(k.data(), size, c.keys_f16.data());
      FloatToHalf(v.data(), size, c.values_f16.data());
    } else {
      c.keys = k;
      c.values = v;
    }
    c.positions.resize(static_cast<size_t>(context + 1));
    for (int64_t r = 0; r <= context; ++r) c.positions[static_cast<size_t>(r)] = r;
  }
  return caches;
}

KvSlotState Slot(LayerCache& c, bool half) {
  KvSlotState slot;
  if (half) {
    slot.keys_f16 = c.keys_f16.data();
    slot.values_f16 = c.values_f16.data();
  } else {
    slot.keys = c.keys.data();
    slot.values = c.values.data();
  }
  slot.positions = c.positions.data();
  slot.count = &c.count;
  return slot;
}

int64_t StepBytes(int64_t context, bool half) {
  return 2 * context * kRow * static_cast<int64_t>(half ? sizeof(uint16_t) : sizeof(float));
}

// Args: context, fp16 (0: fp32 cache, 1: fp16), layers, path (0: portable, 1: avx512; skipped
// where the CPU lacks it).
void BM_KvDecode(benchmark::State& state) {
  const int64_t context = state.range(0);
  const bool half = state.range(1) != 0;
  const int64_t layers = state.range(2);
  const auto path = static_cast<KvDecodePath>(state.range(3));
  const std::vector<KvDecodePath> paths = SupportedKvDecodePaths();
  if (std::find(paths.begin(), paths.end(), path) == paths.end()) {
    state.SkipWithError("this CPU lacks the path");
    return;
  }
  state.SetLabel(std::string(KvDecodePathName(path)));
  const KvAttentionShape shape = Shape(context, half);
  std::vector<LayerCache> caches = MakeCaches(context, half, layers);
  const std::vector<float> q = RandomNormal(kRow, 7), k = RandomNormal(kRow, 8),
                           v = RandomNormal(kRow, 9);
  std::vector<float> out(kRow);
  const int64_t position = context;  // attends over context cached rows + its own
  int64_t layer = 0;
  for (auto _ : state) {
    LayerCache& c = caches[static_cast<size_t>(layer)];
    c.count = context;  // the step appends row `context` and attends over context + 1 rows
    const KvSlotState slot = Slot(c, half);
    KvDecode(Pool(), shape, absl::MakeConstSpan(&position, 1), absl::MakeConstSpan(&slot, 1),
             q.data(), k.data(), v.data(), out.data(), path);
    benchmark::DoNotOptimize(out.data());
    layer = (layer + 1) % layers;
  }
  state.SetBytesProcessed(state.iterations() * StepBytes(context + 1, half));
  state.counters["flops"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 4.0 * static_cast<double>((context + 1) * kRow),
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_KvDecode)
    ->ArgsProduct({{1024, 4096, 16384, 65536}, {0, 1}, {1, 12}, {0, 1}})
    ->ArgNames({"context", "fp16", "layers", "path"})
    ->UseRealTime();

// The roofline of BM_KvDecode: the same bytes read once (summed as 32-bit words, one contiguous
// share per pool thread), same layer rotation.
void BM_KvStream(benchmark::State& state) {
  const int64_t context = state.range(0);
  const bool half = state.range(1) != 0;
  const int64_t layers = state.range(2);
  const int64_t words = StepBytes(context + 1, half) / 4;
  std::vector<uint32_t> data(static_cast<size_t>(words * layers), 1);
  std::vector<uint32_t> sums(static_cast<size_t>(Pool().num_threads()));
  int64_t layer = 0;
  for (auto _ : state) {
    const uint32_t* base = data.data() + layer * words;
    const int64_t shares = Pool().num_threads();
    Pool().ParallelFor(shares, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t lo = words * s / shares, hi = words * (s + 1) / shares;
        uint32_t sum = 0;
        for (int64_t i = lo; i < hi; ++i) sum += base[i];
        sums[static_cast<size_t>(s)] = sum;
      }
    });
    benchmark::DoNotOptimize(sums.data());
    layer = (layer + 1) % layers;
  }
  state.SetBytesProcessed(state.iterations() * words * 4);
}
BENCHMARK(BM_KvStream)
    ->ArgsProduct({{1024, 4096, 16384, 65536}, {0, 1}, {12}})
    ->ArgNames({"context", "fp16", "layers"})
    ->UseRealTime();

}  // namespace
}  // namespace ps::kernels::cpu

int main(int argc, char** argv) { return ps::bench::RunBenchmarks(argc, argv); }
