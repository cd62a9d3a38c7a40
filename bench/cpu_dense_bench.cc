// Microbenchmarks of kernels/cpu/dense.h: Linear at the model's shapes (decode m = 1, 8, 32 and
// prefill m = 512, 2048), LayerNorm and GeluGate at m = 512. Never asserts.
//   Linear flops = 2 m n k; weight bytes = 4 n k (the bound at small m: GB/s of W streamed).
//   --threads=N (or PS_BENCH_THREADS) sizes the pool; default hardware_concurrency.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench/bench_util.h"
#include "kernels/cpu/dense.h"

namespace ps::kernels::cpu {
namespace {

using ::ps::bench::Pool;
using ::ps::bench::RandomNormal;

// Args: m, n, k.
void BM_Linear(benchmark::State& state) {
  const int64_t m = state.range(0);
  const int64_t n = state.range(1);
  const int64_t k = state.range(2);
  const std::vector<float> w = RandomNormal(n * k, 1);
  const auto packed = CpuLinearWeight::Create(w, n, k);
  const std::vector<float> x = RandomNormal(m * k, 2);
  std::vector<float> y(m * n);
  for (auto _ : state) {
    Linear(Pool(), x.data(), m, *packed, y.data(), /*accumulate=*/false);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * m * n * k;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["threads"] = Pool().num_threads();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * n * k * 4);  // W streamed
}

void LinearShapes(benchmark::internal::Benchmark* b) {
  const int64_t weights[][2] = {// tiny model (D = 192): qkv, out, ffn up, ffn down, logits
                                {576, 192},
                                {192, 192},
                                {1024, 192},
                                {192, 512},
                                {256, 192},
                                // GPT-2-small shape (D = 768)
                                {2304, 768},
                                {768, 768},
                                {4096, 768},
                                {768, 2048},
                                {256, 768}};
  for (int64_t m : {1, 8, 32, 512}) {
    for (const auto& wk : weights) b->Args({m, wk[0], wk[1]});
  }
  // learned-sketch MLP (8r = 256, r = 32, h = 64): m = rows * heads
  const int64_t sketch[][2] = {{256, 64}, {32, 256}, {256, 32}};
  for (int64_t m : {3, 24, 96, 2048}) {
    for (const auto& wk : sketch) b->Args({m, wk[0], wk[1]});
  }
}
BENCHMARK(BM_Linear)->Apply(LinearShapes)->ArgNames({"m", "n", "k"})->UseRealTime();

void BM_LayerNorm(benchmark::State& state) {
  const int64_t m = state.range(0);
  const int64_t n = state.range(1);
  const std::vector<float> x = RandomNormal(m * n, 3);
  const std::vector<float> gamma = RandomNormal(n, 4);
  const std::vector<float> beta = RandomNormal(n, 5);
  std::vector<float> y(m * n);
  for (auto _ : state) {
    LayerNorm(Pool(), x.data(), m, n, gamma.data(), beta.data(), 1e-5f, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * m * n * 8);  // read + write
}
BENCHMARK(BM_LayerNorm)->Args({512, 192})->Args({512, 768})->ArgNames({"m", "n"})->UseRealTime();

void BM_GeluGate(benchmark::State& state) {
  const int64_t m = state.range(0);
  const int64_t f = state.range(1);
  const std::vector<float> up = RandomNormal(m * 2 * f, 6);
  std::vector<float> out(m * f);
  for (auto _ : state) {
    GeluGate(Pool(), up.data(), m, f, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * m * f);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * m * f * 12);
}
BENCHMARK(BM_GeluGate)->Args({512, 512})->Args({512, 2048})->ArgNames({"m", "f"})->UseRealTime();

}  // namespace
}  // namespace ps::kernels::cpu

int main(int argc, char** argv) { return ps::bench::RunBenchmarks(argc, argv); }
