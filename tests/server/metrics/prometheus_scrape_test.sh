#!/usr/bin/env bash
# A real Prometheus server (Debian's `prometheus`) scrapes polysketch-server's /metrics, and
# PromQL over the time-to-first-token histogram returns data (issue 5, "Done when").
# Starts polysketch-server on free ports, sends Generate requests with a Python gRPC client
# (stubs generated from proto/ into a temp dir), checks the config with promtool, runs
# Prometheus scraping every second and polls its HTTP API. Everything started is killed on exit.
#
# Usage: prometheus_scrape_test.sh <polysketch-server binary> <repo root>
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 <polysketch-server binary> <repo root>" >&2
  exit 2
fi
server_bin=$1
root=$2
python=/usr/bin/python3  # Debian's, with python3-grpcio and python3-protobuf
model=$root/tests/golden/polysketch-random
timeout_s=60

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

for tool in "$server_bin" /usr/bin/prometheus /usr/bin/promtool /usr/bin/protoc \
  /usr/bin/grpc_python_plugin "$python"; do
  [[ -x $tool ]] || fail "$tool is missing (scripts/setup-deps installs it)"
done
[[ -d $model ]] || fail "no model at $model"

tmp=$(mktemp -d)
server_pid=
prometheus_pid=
# Stops what this script started, by pid: TERM, then KILL after 10 s.
stop() {
  local pid=$1
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop "$prometheus_pid"
  stop "$server_pid"
  if [[ $rc -ne 0 ]]; then
    for log in server.log prometheus.log; do
      if [[ -f $tmp/$log ]]; then
        echo "--- last lines of $log" >&2
        tail -n 30 "$tmp/$log" >&2
      fi
    done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# --- polysketch-server on free ports --------------------------------------------------------
"$server_bin" --model "$model" --host 127.0.0.1 --port 0 \
  --metrics_host 127.0.0.1 --metrics_port 0 --http_port 0 2>"$tmp/server.log" &
server_pid=$!
ready_re='serving .* on .*:([0-9]+), metrics on .*:([0-9]+)'
grpc_port=
metrics_port=
for _ in $(seq $((timeout_s * 10))); do
  kill -0 "$server_pid" 2>/dev/null || fail "polysketch-server exited before it was ready"
  if line=$(grep -m1 -E "^polysketch-server: $ready_re" "$tmp/server.log"); then
    [[ $line =~ $ready_re ]]
    grpc_port=${BASH_REMATCH[1]}
    metrics_port=${BASH_REMATCH[2]}
    break
  fi
  sleep 0.1
done
[[ -n $metrics_port ]] || fail "polysketch-server printed no ready line within ${timeout_s}s"
echo "polysketch-server: gRPC on 127.0.0.1:$grpc_port, metrics on 127.0.0.1:$metrics_port"

# --- a Python gRPC client -------------------------------------------------------------------
mkdir -p "$tmp/py"
/usr/bin/protoc -I "$root/proto" --python_out="$tmp/py" --grpc_python_out="$tmp/py" \
  --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin polysketch/v1/generation.proto
cat >"$tmp/generate.py" <<'EOF'
"""generate.py PORT N: sends N Generate requests; each must produce tokens."""
import sys

import grpc

from polysketch.v1 import generation_pb2, generation_pb2_grpc

port, count = int(sys.argv[1]), int(sys.argv[2])
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    for i in range(count):
        request = generation_pb2.GenerateRequest(
            text=f"In the beginning {i}".encode(), max_new_tokens=8,
            sampling=generation_pb2.SamplingParams(temperature=0.0))
        response = stub.Generate(request, timeout=30)
        if response.final.generated_tokens < 1:
            sys.exit(f"request {i}: no tokens generated: {response}")
print(f"{count} Generate requests answered")
EOF
generate() {
  PYTHONPATH=$tmp/py "$python" "$tmp/generate.py" "$grpc_port" "$1"
}

# The query answer's first value, "" when the result is empty (Prometheus HTTP API, instant
# query), or the reason when the API call failed.
cat >"$tmp/query.py" <<'EOF'
"""query.py URL PROMQL: prints the first value of an instant query ('' when empty)."""
import json
import sys
import urllib.parse
import urllib.request

url = sys.argv[1] + "/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
except OSError as e:  # not listening yet
    print(f"error: {e}")
    sys.exit(0)
if answer.get("status") != "success":
    print(f"error: {answer}")
elif answer["data"]["result"]:
    print(answer["data"]["result"][0]["value"][1])
EOF
query() {
  "$python" "$tmp/query.py" "http://127.0.0.1:$prometheus_port" "$1"
}
# Polls `query` until its value satisfies the Python predicate on `v` (a float).
poll() {
  local promql=$1 predicate=$2 value=
  for _ in $(seq "$timeout_s"); do
    value=$(query "$promql")
    if [[ -n $value && $value != error:* ]] &&
      "$python" -c "import sys; v = float(sys.argv[1]); sys.exit(0 if ($predicate) else 1)" \
        "$value"; then
      echo "PromQL $promql = $value"
      return 0
    fi
    sleep 1
  done
  fail "PromQL $promql gave '$value', not $predicate, within ${timeout_s}s"
}

generate 3

# The endpoint itself, before Prometheus: the TTFT histogram counted the requests.
metrics=$("$python" -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], \
timeout=5).read().decode())" "http://127.0.0.1:$metrics_port/metrics")
ttft_count=$(awk '$1 == "polysketch_time_to_first_token_seconds_count" { print $2 }' <<<"$metrics")
[[ -n $ttft_count ]] || fail "/metrics has no polysketch_time_to_first_token_seconds_count"
"$python" -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 3 else 1)" "$ttft_count" ||
  fail "polysketch_time_to_first_token_seconds_count is $ttft_count after 3 requests"

# --- Prometheus -----------------------------------------------------------------------------
prometheus_port=$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); \
print(s.getsockname()[1])")
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: polysketch
    static_configs:
      - targets: ["127.0.0.1:$metrics_port"]
EOF
/usr/bin/promtool check config "$tmp/prometheus.yml" || fail "promtool rejects prometheus.yml"
/usr/bin/prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$prometheus_port" >"$tmp/prometheus.log" 2>&1 &
prometheus_pid=$!

poll 'up{job="polysketch"}' 'v == 1'
poll 'polysketch_time_to_first_token_seconds_count' 'v >= 3'
poll 'polysketch_request_failure_total{reason="validation"}' 'v == 0'  # labels exported at 0
# More requests after the first scrapes, so the rate over the window is not zero and the
# quantile is a number.
generate 3
poll 'histogram_quantile(0.9, sum(rate(polysketch_time_to_first_token_seconds_bucket[1m])) by (le))' \
  'v == v and v > 0'
poll 'polysketch_process_resident_memory_bytes' 'v > 0'
echo "PASS"
