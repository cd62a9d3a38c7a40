#!/usr/bin/env bash
# The cost of the HTTP API against gRPC (docs/performance.md, "HTTP API vs gRPC"): one server on a
# model, polysketch-loadgen at the same load through each API in turn (--api grpc, then
# --api http, ROUNDS times, alternating, so slow drift of a shared machine hits both alike), and
# the median over rounds of TTFT (p50, p90), time per output token (mean), generated tokens/s,
# requests/s and the server's CPU time per 1000 generated tokens (utime + stime of the process
# from /proc, which includes its engine: the API's own share is the difference between the rows).
#   bench/http_vs_grpc.sh [MODEL_DIR] [CONCURRENCIES] [REQUESTS] [PROMPT_BYTES] [MAX_NEW_TOKENS]
#                         [ROUNDS] [server flags...]
# defaults: models/tiny-polysketch "1 8" 32 256 128 3. Needs a build (scripts/build).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-${root}/models/tiny-polysketch}"
concurrencies="${2:-1 8}"
requests="${3:-32}"
prompt_bytes="${4:-256}"
max_new="${5:-128}"
rounds="${6:-3}"
shift $(($# < 6 ? $# : 6))
loadgen="${root}/build/clients/polysketch-loadgen"
tmp="$(mktemp -d)"
# shellcheck source=bench/server_lib.sh
source "${root}/bench/server_lib.sh"
trap 'stop_server; rm -rf "${tmp}"' EXIT

start_server "${model}" "$@"
[[ -n "${http_port}" ]] || { echo "no HTTP port in the server log" >&2; exit 1; }
echo "model $(basename "${model}"), ${requests} requests per run, prompt ${prompt_bytes} bytes," \
  "max_new_tokens ${max_new}, temperature 0, ${rounds} rounds; server flags: $*"
for c in ${concurrencies}; do
  for ((r = 1; r <= rounds; r++)); do
    for api in grpc http; do
      before="$(awk '{ print $14 + $15 }' "/proc/${pid}/stat")"
      "${loadgen}" --api "${api}" --target "127.0.0.1:${port}" \
        --http_target "127.0.0.1:${http_port}" --concurrency "${c}" --num_requests "${requests}" \
        --prompt_bytes "${prompt_bytes}" --max_new_tokens "${max_new}" --temperature 0 \
        --seed "${r}" --json > "${tmp}/${api}-${c}-${r}.json" 2> "${tmp}/${api}-${c}-${r}.txt" \
        || { cat "${tmp}/${api}-${c}-${r}.txt" >&2; exit 1; }
      after="$(awk '{ print $14 + $15 }' "/proc/${pid}/stat")"
      echo $(((after - before) * 1000 / $(getconf CLK_TCK))) > "${tmp}/${api}-${c}-${r}.cpu_ms"
    done
  done
done
/usr/bin/python3 - "${tmp}" "${concurrencies}" "${rounds}" << 'PY'
import json, statistics, sys
tmp, concurrencies, rounds = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
print("| concurrency | API | TTFT p50 (ms) | TTFT p90 (ms) | TPOT mean (ms) | generated tokens/s"
      " | requests/s | server CPU ms / 1000 tokens |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for c in concurrencies:
    for api in ("grpc", "http"):
        runs = [json.load(open(f"{tmp}/{api}-{c}-{r}.json")) for r in range(1, rounds + 1)]
        for r, x in enumerate(runs, 1):
            x["cpu_ms"] = int(open(f"{tmp}/{api}-{c}-{r}.cpu_ms").read())
        med = lambda f: statistics.median(f(x) for x in runs)
        print(f"| {c} | {'gRPC' if api == 'grpc' else 'HTTP'} "
              f"| {med(lambda x: x['ttft_seconds']['p50']) * 1e3:.2f} "
              f"| {med(lambda x: x['ttft_seconds']['p90']) * 1e3:.2f} "
              f"| {med(lambda x: x['tpot_seconds']['mean']) * 1e3:.3f} "
              f"| {med(lambda x: x['generated_tokens_per_second']):.0f} "
              f"| {med(lambda x: x['requests_per_second']):.2f} "
              f"| {med(lambda x: x['cpu_ms'] / x['generated_tokens'] * 1000):.0f} |")
PY
