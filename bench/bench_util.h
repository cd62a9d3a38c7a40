// Shared pieces of the Google Benchmark programs in bench/: the kernel thread pool (size from
// --threads=N or PS_BENCH_THREADS, default one per hardware thread), random inputs, and main.
#ifndef POLYSKETCH_BENCH_BENCH_UTIL_H_
#define POLYSKETCH_BENCH_BENCH_UTIL_H_

#include <cstdint>
#include <vector>

#include "kernels/cpu/thread_pool.h"

namespace ps::bench {

// The pool every benchmark of the program uses; created on first use.
kernels::cpu::ThreadPool& Pool();

// `size` floats from a standard normal distribution, reproducible from `seed`.
std::vector<float> RandomNormal(int64_t size, uint32_t seed);

// Parses --threads=N (removed before Google Benchmark sees the arguments), then runs the
// registered benchmarks. Returns main's exit status.
int RunBenchmarks(int argc, char** argv);

}  // namespace ps::bench

#endif  // POLYSKETCH_BENCH_BENCH_UTIL_H_
