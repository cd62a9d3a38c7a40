#!/usr/bin/env bash
# Held-out bits per byte of each --weights_dtype through the C++ engine (issue 19 item 2): for
# every model and format, starts polysketch-server with that --weights_dtype and runs
# `polysketch_eval perplexity` against it (the evaluation of docs/evaluation.md, the same windows
# as train/eval.py), then prints one table with each format's change against fp32.
#   bench/weights_dtype_quality.sh [MODEL_DIR...]   (default: models/long-polysketch models/long-softmax)
# Environment: DTYPES (default "fp32 bf16 int8"), LENGTHS (default 1k,8k), MAX_BYTES (default
# 131072), THREADS (default 2), OUT (folder for the JSON results; default a temporary one).
# Needs scripts/build (polysketch-server and build/python, or PS_PYTHONPATH naming another
# build/python); writes data/corpus/ if it is missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "${root}"
tmp="$(mktemp -d)"
# shellcheck source=bench/server_lib.sh
source "${root}/bench/server_lib.sh"
trap 'stop_server; rm -rf "${tmp}"' EXIT

# shellcheck disable=SC2206  # a list of words on purpose
dtypes=(${DTYPES:-fp32 bf16 int8})
lengths="${LENGTHS:-1k,8k}"
max_bytes="${MAX_BYTES:-131072}"
threads="${THREADS:-2}"
out="${OUT:-${tmp}/results}"
mkdir -p "${out}"
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(models/long-polysketch models/long-softmax)
[[ -f data/corpus/heldout.txt ]] || /usr/bin/python3 train/corpus.py > /dev/null

for model in "${models[@]}"; do
  for dtype in "${dtypes[@]}"; do
    start_server "${model}" --weights_dtype "${dtype}" --threads "${threads}" --slots 1 \
      --prefix_cache_bytes 0 --session_budget_bytes 0 --max_context 16384
    grep "linear weights in" "${tmp}/server.log" >&2
    PYTHONPATH="${PS_PYTHONPATH:-${root}/build/python}" /usr/bin/python3 -m polysketch_eval \
      --target "127.0.0.1:${port}" perplexity --lengths "${lengths}" --max_bytes "${max_bytes}" \
      --out "${out}/$(basename "${model}")-${dtype}.json" > /dev/null
    stop_server
  done
done

/usr/bin/python3 - "${out}" "${dtypes[@]}" -- "${models[@]}" << 'PY'
import json
import os
import sys

args = sys.argv[1:]
out, rest = args[0], args[1:]
split = rest.index("--")
dtypes, models = rest[:split], rest[split + 1:]
print("| model | weights | length | bpb all | vs fp32 | bpb tail | vs fp32 |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for model in models:
    name = os.path.basename(model.rstrip("/"))
    runs = {d: json.load(open(os.path.join(out, f"{name}-{d}.json")))["results"] for d in dtypes}
    base = {r["length"]: r for r in runs.get("fp32", [])}
    for d in dtypes:
        for r in runs[d]:
            b = base.get(r["length"])
            rel = (lambda key: f"{100 * (r[key] / b[key] - 1):+.2f}%" if b else "")
            print(f"| {name} | {d} | {r['length']} | {r['bpb_all']:.4f} | {rel('bpb_all')} "
                  f"| {r['bpb_tail']:.4f} | {rel('bpb_tail')} |")
PY
