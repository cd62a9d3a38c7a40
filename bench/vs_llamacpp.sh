#!/usr/bin/env bash
# The engine against llama.cpp on this machine (issue 19 item 4; docs/performance.md, "Side by
# side with llama.cpp"): batch 1, the same thread count on both sides, contexts 1k to 64k, weights
# in fp32, 16-bit and 8-bit. llama.cpp is node-llama-cpp's prebuilt CPU binary, pinned and
# installed into bench/llamacpp/node_modules by bench/llamacpp/setup (nothing is downloaded or
# built at run time: where it can, the run happens in a network namespace with no network), on a
# random-weight GPT-2-small GGUF that bench/llamacpp/gguf_gpt2.py writes for the run. The engine
# side is polysketch-bench on gpt2-small-softmax and gpt2-small-polysketch.
#   bench/vs_llamacpp.sh [CONTEXTS] [THREADS] [FORMATS] [extra bench/vs_llamacpp.py flags]
#   bench/vs_llamacpp.sh 1024,4096,16384,65536 2 fp32,16bit,8bit     # the full sweep (hours)
# Appends rows to bench/results/vs_llamacpp.jsonl and writes the table bench/results/vs_llamacpp.md
# (--out / --table change them). Run on an otherwise idle machine: the figures are wall-clock.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
contexts="${1:-1024,4096,16384,65536}"
threads="${2:-2}"
formats="${3:-fp32,16bit,8bit}"
shift $(( $# < 3 ? $# : 3 ))

[[ -x build/bench/polysketch-bench ]] || { echo "build first: scripts/build polysketch-bench" >&2; exit 1; }
bench/llamacpp/setup
/usr/bin/python3 bench/vs_llamacpp.py --contexts "${contexts}" --threads "${threads}" \
  --formats "${formats}" "$@"
