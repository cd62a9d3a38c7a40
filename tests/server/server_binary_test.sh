#!/usr/bin/env bash
# polysketch-server as a process: --help lists the flags, a bad --model exits 1 naming the path,
# the ready line gives the ports, health is SERVING and Generate works (Python grpcio client,
# stubs generated into a temp dir), and SIGTERM during a long stream drains: readiness
# NOT_SERVING, new requests UNAVAILABLE, exit 0 within --drain_timeout + a few seconds.
# Usage: server_binary_test.sh <polysketch-server> <repo root>
set -euo pipefail
server="$1"
root="$2"
# shellcheck source=tests/testing/server_process.sh
source "${root}/tests/testing/server_process.sh"

# --help documents every flag.
help="$("${server}" --help 2>&1 || true)"
for flag in model host port metrics_host metrics_port slots max_batch max_waiting \
  max_waiting_tokens max_prompt_tokens max_new_tokens_limit max_context prefill_chunk \
  prefill_tokens_per_step threads drain_timeout watchdog_timeout; do
  grep -q -- "--${flag} " <<< "${help}" || fail "--help does not list --${flag}"
done

# A bad model directory: exit 1 and a message naming it.
set +e
out="$("${server}" --model "${tmp}/no-such-model" --port 0 --metrics_port 0 --http_port 0 2>&1)"
rc=$?
set -e
[[ ${rc} -eq 1 ]] || fail "bad --model exited ${rc}, want 1"
grep -q "${tmp}/no-such-model" <<< "${out}" || fail "bad --model message does not name it: ${out}"

# A negative --watchdog_timeout is refused (0 disables the watchdog).
set +e
out="$("${server}" --model "${root}/tests/golden/polysketch-random" --port 0 --metrics_port 0 \
  --http_port 0 --watchdog_timeout=-1s 2>&1)"
rc=$?
set -e
[[ ${rc} -eq 1 ]] || fail "--watchdog_timeout=-1s exited ${rc}, want 1"
grep -q -- "--watchdog_timeout" <<< "${out}" || fail "bad --watchdog_timeout message: ${out}"

# Start on free ports; the ready line gives them.
log="${tmp}/server.log"
start_server "${root}/tests/golden/polysketch-random" --threads 2 --drain_timeout 2s \
  --max_new_tokens_limit 1000000

if /usr/bin/python3 -c "import grpc" 2> /dev/null; then
  mkdir -p "${tmp}/py/grpc_health_stub"
  cat > "${tmp}/health.proto" << 'PROTO'
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
PROTO
  protoc --proto_path="${root}/proto" --proto_path="${tmp}" --python_out="${tmp}/py" \
    --grpc_python_out="${tmp}/py" --plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin \
    "${root}/proto/polysketch/v1/generation.proto" "${tmp}/health.proto"
  cat > "${tmp}/check.py" << 'PY'
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import grpc
import health_pb2, health_pb2_grpc
from polysketch.v1 import generation_pb2 as pb, generation_pb2_grpc as pbg
port, pid, metrics_port = sys.argv[2], int(sys.argv[3]), sys.argv[4]
ch = grpc.insecure_channel(f"127.0.0.1:{port}")
health = health_pb2_grpc.HealthStub(ch)
stub = pbg.GenerationServiceStub(ch)
def status(name):
    return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
assert status("") == 1, "liveness"
assert status("polysketch.v1.GenerationService") == 1, "readiness"
r = stub.Generate(pb.GenerateRequest(text=b"Hello", max_new_tokens=8,
                                     sampling=pb.SamplingParams(temperature=0)), timeout=30)
assert r.final.generated_tokens == 8 and len(r.tokens) == 8, r
# A client that vanishes mid-stream frees its slot, and the metrics show it.
import re, urllib.request
def metric(name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None
gone = stub.GenerateStream(pb.GenerateRequest(text=b"Bye", max_new_tokens=1000000), timeout=60)
next(gone)
assert metric("polysketch_state_slots_used") == 1, metric("polysketch_state_slots_used")
gone.cancel()
for _ in range(100):
    if metric("polysketch_state_slots_used") == 0 and \
            metric('polysketch_request_failure_total{reason="cancelled"}') == 1:
        break
    time.sleep(0.05)
else:
    raise AssertionError("slot not freed after the client went away: used %s, cancelled %s" % (
        metric("polysketch_state_slots_used"),
        metric('polysketch_request_failure_total{reason="cancelled"}')))
# A long stream; SIGTERM once it runs.
stream = stub.GenerateStream(pb.GenerateRequest(text=b"Hi", max_new_tokens=1000000), timeout=60)
next(stream)
os.kill(pid, signal.SIGTERM)
# Readiness turns NOT_SERVING (2) once the server has the signal: wait for it, with a deadline.
deadline = time.monotonic() + 10
while status("polysketch.v1.GenerationService") != 2:
    assert time.monotonic() < deadline, "readiness still SERVING 10 s after SIGTERM"
    time.sleep(0.02)
try:
    stub.Generate(pb.GenerateRequest(text=b"x", max_new_tokens=2), timeout=5)
    raise AssertionError("Generate while draining succeeded")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
code = None
try:
    for _ in stream:
        pass
except grpc.RpcError as e:
    code = e.code()
# Cancelled by the drain: CANCELLED, or UNAVAILABLE when the shutdown closes the connection first.
assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), code
print("python checks passed")
PY
  /usr/bin/python3 "${tmp}/check.py" "${tmp}/py" "${port}" "${pid}" "${metrics_port}" || fail "python checks"
else
  kill -TERM "${pid}"
  fail "python3-grpcio is not installed (scripts/setup-deps installs it)"
fi

# Exit 0 within drain_timeout (2 s) + a few seconds.
for _ in $(seq 1 80); do
  kill -0 "${pid}" 2> /dev/null || break
  sleep 0.1
done
if kill -0 "${pid}" 2> /dev/null; then fail "server still running 8 s after SIGTERM"; fi
set +e
wait "${pid}"
rc=$?
set -e
pid=""
[[ ${rc} -eq 0 ]] || fail "server exited ${rc} after SIGTERM, want 0"
cat "${log}"
echo "PASS"
