#include "bench/bench_util.h"

#include <cstdlib>
#include <cstring>
#include <random>

#include <benchmark/benchmark.h>

namespace ps::bench {
namespace {

int g_threads = 0;  // 0: hardware_concurrency

}  // namespace

kernels::cpu::ThreadPool& Pool() {
  static kernels::cpu::ThreadPool* pool = new kernels::cpu::ThreadPool(g_threads);
  return *pool;
}

std::vector<float> RandomNormal(int64_t size, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(size));
  for (float& x : v) x = dist(rng);
  return v;
}

int RunBenchmarks(int argc, char** argv) {
  if (const char* env = std::getenv("PS_BENCH_THREADS")) g_threads = std::atoi(env);
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      g_threads = std::atoi(argv[i] + 10);
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace ps::bench
