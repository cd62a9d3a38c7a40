#!/usr/bin/env bash
# Issue 19 item 3 (docs/performance.md, "local_exact without S_cur"): the local_exact decode step
# before and after the slot dropped S_cur, in one run on the same machine state.
#   1. Kernel, one layer (build/bench/cpu_sketch_bench, BM_SketchDecode): the current kernel
#      (kernel:0) and the former one with S_cur (kernel:1, bench/legacy_sketch_decode.cc, built
#      into the same binary), tiny (shape:1, H 3, b 128) and GPT-2-small (shape:2, H 12, b 256)
#      shapes, batch 1 and 32, an ordinary step (step:0) and the block-start step that folds
#      (step:1), state from a 256 MiB working set; bytes_per_step is the napkin count of the file
#      comment. Median of 3 repetitions.
#   2. Engine, whole model (polysketch-bench): OLD_BENCH (a polysketch-bench built at the commit
#      before, e.g. main's build/bench/polysketch-bench copied aside) against build/bench/
#      polysketch-bench, tiny-polysketch and gpt2-small-polysketch at context 1024, batches 1 and
#      32: step time (median of --steps ordinary steps), state bytes per request and bytes moved.
#   bench/local_exact_state.sh [OLD_BENCH] [THREADS]    (default: no engine baseline, 2 threads)
# Benchmarks print; they assert nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
old="${1:-}"
threads="${2:-2}"

echo "=== kernel: one local_exact layer, current (kernel:0) vs S_cur (kernel:1)"
"${root}/build/bench/cpu_sketch_bench" --threads="${threads}" \
  --benchmark_filter='BM_SketchDecode/shape:[12]/' --benchmark_repetitions=3 \
  --benchmark_report_aggregates_only=true --benchmark_counters_tabular=true --benchmark_min_time=0.2

for model in "${root}/models/tiny-polysketch" gpt2-small-polysketch; do
  for bench in ${old:+"${old}"} "${root}/build/bench/polysketch-bench"; do
    echo "=== engine: ${model##*/} with ${bench}"
    "${bench}" --model "${model}" --device cpu --contexts 1024 --batches 1,32 --steps 16 \
      --threads "${threads}" --copy_mib 256
  done
done
