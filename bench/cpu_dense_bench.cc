// Microbenchmarks of kernels/cpu/dense.h: Linear at the model's shapes (decode m = 1, 8, 32 and
// prefill m = 512, 2048), LayerNorm and GeluGate at m = 512; and (BM_LinearDtype) Linear with
// fp32, bf16 and int8 weights on each kernel path of kernels/cpu/lowp_linear.h. Never asserts.
//   Linear flops = 2 m n k; weight bytes = 4 n k (the bound at small m: GB/s of W streamed).
//   --threads=N (or PS_BENCH_THREADS) sizes the pool; default hardware_concurrency.
// The baselines the two CPU choices of docs/performance.md ("Kernel choices") rest on, built when
// CMake finds them, so that anyone can re-measure them on their machine:
//   BM_LinearOpenBLAS   the same shapes through OpenBLAS's cblas_sgemm (libopenblas-dev), on as
//                       many threads as the pool; compare with BM_Linear row by row.
//   BM_ForkJoin/pool vs BM_ForkJoin/openmp   one parallel loop per call, the size of the model's
//                       small ops (a matrix-vector product, rows split over the threads), on our
//                       ThreadPool and on an OpenMP `parallel for` with the same thread count.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <benchmark/benchmark.h>

#if defined(PS_HAVE_OPENBLAS)
#include <cblas.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "bench/bench_util.h"
#include "kernels/cpu/dense.h"
#include "kernels/cpu/lowp_linear.h"

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

// Linear with the weight formats of issue 19 (kernels/cpu/lowp_linear.h) at the GPT-2-small
// shapes, fp32 measured in the same run so the ratios compare like with like. Args: m, n, k,
// dtype (0 fp32 = CpuLinearWeight, 1 bf16, 2 int8), path (index into SupportedLowpIsas(); the
// label names it; ignored for fp32). Weight bytes = (4, 2, 1) n k: at m = 1 the bound is GB/s of
// W streamed, so bf16 and int8 can at most halve and quarter the fp32 time.
void BM_LinearDtype(benchmark::State& state) {
  const int64_t m = state.range(0);
  const int64_t n = state.range(1);
  const int64_t k = state.range(2);
  const auto dtype = static_cast<WeightDtype>(state.range(3));
  const LowpIsa isa = SupportedLowpIsas()[static_cast<size_t>(state.range(4))];
  const std::vector<float> w = RandomNormal(n * k, 1);
  const std::vector<float> x = RandomNormal(m * k, 2);
  std::vector<float> y(m * n);
  std::unique_ptr<CpuLinearWeight> fp32;
  std::unique_ptr<CpuLowpLinearWeight> lowp;
  int64_t weight_bytes = 4 * n * k;
  if (dtype == WeightDtype::kFp32) {
    fp32 = CpuLinearWeight::Create(w, n, k);
    state.SetLabel("fp32");
  } else {
    absl::StatusOr<std::unique_ptr<CpuLowpLinearWeight>> created =
        CpuLowpLinearWeight::Create(w, n, k, dtype);
    if (!created.ok()) {
      state.SkipWithError(std::string(created.status().message()).c_str());
      return;
    }
    lowp = *std::move(created);
    weight_bytes = lowp->bytes();
    state.SetLabel(std::string(WeightDtypeName(dtype)) + "/" + std::string(LowpIsaName(isa)));
  }
  for (auto _ : state) {
    if (fp32 != nullptr) {
      Linear(Pool(), x.data(), m, *fp32, y.data(), /*accumulate=*/false);
    } else {
      LinearLowp(Pool(), x.data(), m, *lowp, y.data(), /*accumulate=*/false, isa);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * m * n * k;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * weight_bytes);
}

void LinearDtypeShapes(benchmark::internal::Benchmark* b) {
  // GPT-2-small (D = 768): qkv, out, ffn up, ffn down.
  const int64_t weights[][2] = {{2304, 768}, {768, 768}, {4096, 768}, {768, 2048}};
  const int64_t num_isas = static_cast<int64_t>(SupportedLowpIsas().size());
  for (int64_t m : {1, 32, 512}) {
    for (const auto& wk : weights) {
      b->Args({m, wk[0], wk[1], 0, 0});
      for (int64_t dtype : {1, 2}) {
        for (int64_t isa = 0; isa < num_isas; ++isa) {
          // The scalar path at prefill sizes takes minutes and says nothing new.
          if (isa == 0 && m > 1) continue;
          b->Args({m, wk[0], wk[1], dtype, isa});
        }
      }
    }
  }
}
BENCHMARK(BM_LinearDtype)
    ->Apply(LinearDtypeShapes)
    ->ArgNames({"m", "n", "k", "dtype", "path"})
    ->UseRealTime();

#if defined(PS_HAVE_OPENBLAS)
// Linear's contract through OpenBLAS: y [m, n] = x [m, k] W^T, W [n, k] row-major (unpacked).
// OPENBLAS_CORETYPE may need setting on VMs whose CPU OpenBLAS misdetects (docs/performance.md).
void BM_LinearOpenBLAS(benchmark::State& state) {
  const int64_t m = state.range(0);
  const int64_t n = state.range(1);
  const int64_t k = state.range(2);
  openblas_set_num_threads(Pool().num_threads());
  const std::vector<float> w = RandomNormal(n * k, 1);
  const std::vector<float> x = RandomNormal(m * k, 2);
  std::vector<float> y(m * n);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), 1.0f, x.data(), static_cast<int>(k), w.data(),
                static_cast<int>(k), 0.0f, y.data(), static_cast<int>(n));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * m * n * k;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["threads"] = openblas_get_num_threads();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * n * k * 4);
}
BENCHMARK(BM_LinearOpenBLAS)->Apply(LinearShapes)->ArgNames({"m", "n", "k"})->UseRealTime();
#endif

// Fork-join overhead at the model's op sizes: y = W x, W [n, k], rows split over the threads in
// chunks of at least 2^14 / k rows (the pool's GEMM grain, docs/performance.md). The same loop body
// on both; only who runs it differs.
void MatVecRows(const float* w, const float* x, int64_t k, float* y, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float sum = 0.0f;
    const float* row = w + r * k;
    for (int64_t i = 0; i < k; ++i) sum += row[i] * x[i];
    y[r] = sum;
  }
}

// Args: runner (0 pool, 1 OpenMP), n, k.
void BM_ForkJoin(benchmark::State& state) {
  const bool openmp = state.range(0) == 1;
  const int64_t n = state.range(1);
  const int64_t k = state.range(2);
  const std::vector<float> w = RandomNormal(n * k, 1);
  const std::vector<float> x = RandomNormal(k, 2);
  std::vector<float> y(n);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / k);
  const int threads = Pool().num_threads();
  for (auto _ : state) {
    if (!openmp) {
      Pool().ParallelFor(n, grain, [&](int64_t begin, int64_t end) {
        MatVecRows(w.data(), x.data(), k, y.data(), begin, end);
      });
    } else {
#if defined(_OPENMP)
      const int64_t chunks = (n + grain - 1) / grain;
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        MatVecRows(w.data(), x.data(), k, y.data(), c * grain, std::min(n, (c + 1) * grain));
      }
#else
      state.SkipWithError("built without OpenMP");
      break;
#endif
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["threads"] = threads;
  state.SetLabel(openmp ? "openmp" : "pool");
}
BENCHMARK(BM_ForkJoin)
    ->ArgsProduct({{0, 1}, {192, 576, 768, 2304}, {192, 768}})
    ->ArgNames({"omp", "n", "k"})
    ->UseRealTime();

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
