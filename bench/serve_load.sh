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
server="${root}/build/polysketch-server"
loadgen="${root}/build/clients/polysketch-loadgen"
tmp="$(mktemp -d)"
pid=""
cleanup() {
  [[ -n "${pid}" ]] && kill -TERM "${pid}" 2> /dev/null && wait "${pid}" 2> /dev/null
  rm -rf "${tmp}"
}
trap cleanup EXIT

"${server}" --model "${model}" --host 127.0.0.1 --port 0 --metrics_host 127.0.0.1 \
  --metrics_port 0 "$@" 2> "${tmp}/server.log" &
pid=$!
for _ in $(seq 1 600); do
  grep -q "^polysketch-server: serving" "${tmp}/server.log" && break
  kill -0 "${pid}" 2> /dev/null || { cat "${tmp}/server.log" >&2; exit 1; }
  sleep 0.1
done
port="$(sed -nE 's/^polysketch-server: serving .* on [^ ]+:([0-9]+), metrics on .*/\1/p' "${tmp}/server.log")"
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
