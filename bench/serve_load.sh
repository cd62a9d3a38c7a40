#!/usr/bin/env bash
# Serving benchmark: starts polysketch-server on a model, drives it with polysketch-loadgen at one
# prompt length, and reports the load generator's figures (requests/s, tokens/s, TTFT and
# inter-token latency percentiles, errors) plus the server's resident memory, idle and at the end.
#   bench/serve_load.sh MODEL_DIR PROMPT_BYTES REQUESTS CONCURRENCY [MAX_NEW_TOKENS] [server flags...]
# Needs a build (scripts/build). Prints one summary line and the loadgen report.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="$1"
prompt_bytes="$2"
requests="$3"
concurrency="$4"
max_new="${5:-128}"
shift $(($# < 5 ? $# : 5))
loadgen="${root}/build/clients/polysketch-loadgen"
tmp="$(mktemp -d)"
# shellcheck source=bench/server_lib.sh
source "${root}/bench/server_lib.sh"
trap 'stop_server; rm -rf "${tmp}"' EXIT

start_server "${model}" "$@"
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/${pid}/status"; }
idle_rss=$(rss_kib)
peak_rss="${idle_rss}"
( while kill -0 "${pid}" 2> /dev/null; do rss_kib >> "${tmp}/rss" 2> /dev/null || true; sleep 0.2; done ) &
sampler=$!

"${loadgen}" --target "127.0.0.1:${port}" --num_requests "${requests}" \
  --concurrency "${concurrency}" --prompt_bytes "${prompt_bytes}" --max_new_tokens "${max_new}" \
  --temperature 0 --json > "${tmp}/report.json" 2> "${tmp}/report.txt" || true
end_rss=$(rss_kib)
kill "${sampler}" 2> /dev/null || true
[[ -s "${tmp}/rss" ]] && peak_rss=$(sort -n "${tmp}/rss" | tail -1)
echo "model $(basename "${model}") prompt_bytes ${prompt_bytes} requests ${requests}" \
  "concurrency ${concurrency} max_new_tokens ${max_new}: server RSS idle $((idle_rss / 1024)) MiB," \
  "peak $((peak_rss / 1024)) MiB, after $((end_rss / 1024)) MiB"
cat "${tmp}/report.txt"
cat "${tmp}/report.json"
