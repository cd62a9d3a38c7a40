#!/usr/bin/env bash
# Every figure of docs/performance.md, in one run on this machine: the engine against the PyTorch
# reference (bench/vs_torch.sh), then polysketch-bench on tiny-polysketch, tiny-softmax and the
# GPT-2-small-shaped polysketch config, then the plots. Takes ~10 minutes on 2 cores.
#   bench/run_all.sh [OUT_DIR]        (default bench/results; plots go to docs/img/)
# Run on an otherwise idle machine: the figures are wall-clock times.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# Models are named relative to the repository root, so that the recorded outputs name no machine path.
cd "${root}"
out="${1:-${root}/bench/results}"
mkdir -p "${out}" "${root}/docs/img"
bench="${root}/build/bench/polysketch-bench"
[[ -x "${bench}" ]] || { echo "build first: scripts/build" >&2; exit 1; }

{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  "${root}/bench/vs_torch.sh" models/tiny-polysketch 2 200
  "${root}/bench/vs_torch.sh" models/tiny-softmax 2 200
} | tee "${out}/vs_torch.txt"

contexts=1024,4096,16384,65536
"${bench}" --model models/tiny-polysketch --contexts "${contexts}" \
  --csv "${out}/tiny-polysketch.csv" | tee "${out}/tiny-polysketch.txt"
"${bench}" --model models/tiny-softmax --contexts "${contexts}" --budget_gib 14 \
  --csv "${out}/tiny-softmax.csv" | tee "${out}/tiny-softmax.txt"
"${bench}" --model gpt2-small-polysketch --contexts "${contexts}" \
  --csv "${out}/gpt2-small-polysketch.csv" | tee "${out}/gpt2-small-polysketch.txt"

if /usr/bin/python3 -c "import matplotlib" 2> /dev/null; then
  /usr/bin/python3 "${root}/bench/plot.py" "${out}" "${root}/docs/img"
else
  echo "no plots: apt-get install python3-matplotlib" >&2
fi
