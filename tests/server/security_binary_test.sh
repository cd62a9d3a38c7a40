#!/usr/bin/env bash
# polysketch-server's security flags as an operator uses them, with polysketch-cli,
# polysketch-loadgen and the Python client (docs/security.md). Certificates are made here by
# tests/testing/make_test_certs.sh (openssl).
#   1. Start-up refusals: mismatched key, missing file, bad tokens file: exit 1 naming the problem.
#   2. TLS + bearer tokens + a plaintext probe port: the C++ CLI, loadgen and the Python client
#      (library and `python3 -m polysketch_client`) work with the CA and a token; a missing or
#      wrong token is UNAUTHENTICATED and the wrong token is never echoed; health and reflection
#      need no token; a plaintext client cannot talk to the TLS port; the probe port serves health
#      only.
#   3. SIGHUP reload: a token added works, a token removed is refused, a broken file keeps the
#      tokens in use and logs why; with --auth_tokens_reload_interval a changed file is reloaded
#      without a signal.
#   4. Mutual TLS: without a client certificate, or with one from another CA, no call gets
#      through; with one from --tls_client_ca the CLI and the Python client work.
#   5. Connection limits reach gRPC: a message over --max_receive_message_bytes is refused, a
#      second call on a connection with --max_concurrent_streams 1 waits for the first, and a
#      PING flood on a raw HTTP/2 connection gets GOAWAY too_many_pings (ENHANCE_YOUR_CALM).
# Usage: security_binary_test.sh <polysketch-server> <polysketch-cli> <polysketch-loadgen>
#        <repo root> <build dir>
set -euo pipefail
server="$1"
cli="$2"
loadgen="$3"
root="$4"
build="$5"
python=/usr/bin/python3
# shellcheck source=tests/testing/server_process.sh
source "${root}/tests/testing/server_process.sh"

certs="${tmp}/certs"
bash "${root}/tests/testing/make_test_certs.sh" "${certs}" > /dev/null 2>&1 \
  || fail "make_test_certs.sh failed (is openssl installed? scripts/setup-deps)"
model="${root}/tests/golden/polysketch-learned-local"
alice="alice-0123456789abcdef0123456789"
bob="bob-0123456789abcdef0123456789ab"
wrong="alice-0123456789abcdef012345678X"
printf '# test tokens\nalice:%s\n' "${alice}" > "${tmp}/tokens"
chmod 644 "${tmp}/tokens"
printf '%s\n' "${alice}" > "${tmp}/alice.token"
printf '%s\n' "${bob}" > "${tmp}/bob.token"
printf '%s\n' "${wrong}" > "${tmp}/wrong.token"

# --help documents the security flags.
help="$("${server}" --help 2>&1 || true)"
for flag in tls_cert tls_key tls_client_ca auth_tokens_file health_port max_receive_message_bytes \
  max_prompt_bytes max_inflight_prompt_bytes max_stream_buffer_bytes max_concurrent_streams \
  keepalive_time keepalive_timeout keepalive_min_client_ping_interval keepalive_max_ping_strikes \
  max_connection_idle; do
  grep -q -- "--${flag} " <<< "${help}" || fail "--help does not list --${flag}"
done

# --- 1. Start-up refusals ------------------------------------------------------------------------
refuse() {  # refuse <expected message> <flags...>
  local want="$1"
  shift
  set +e
  out="$(timeout 30 "${server}" --model "${model}" --host 127.0.0.1 --port 0 --metrics_port 0 \
    --http_port 0 "$@" 2>&1)"
  rc=$?
  set -e
  [[ ${rc} -eq 1 ]] || fail "server with $* exited ${rc}, want 1: ${out}"
  grep -qF -- "${want}" <<< "${out}" || fail "server with $*: no '${want}' in: ${out}"
}
refuse "is not the key of the certificate" --tls_cert "${certs}/server.crt" \
  --tls_key "${certs}/other.key"
refuse "cannot read ${certs}/nope.crt" --tls_cert "${certs}/nope.crt" \
  --tls_key "${certs}/server.key"
refuse "--tls_cert and --tls_key go together" --tls_cert "${certs}/server.crt"
refuse "--tls_client_ca: ${certs}/ca.key holds no PEM certificate" \
  --tls_cert "${certs}/server.crt" --tls_key "${certs}/server.key" --tls_client_ca "${certs}/ca.key"
printf 'alice:short\n' > "${tmp}/bad-tokens"
refuse "line 1: the token must have 16..4096 bytes" --auth_tokens_file "${tmp}/bad-tokens"
grep -q short <<< "${out}" && fail "the refusal echoes the token: ${out}"
refuse "cannot read ${tmp}/none" --auth_tokens_file "${tmp}/none"
echo "ok: start-up refusals name the file and the problem"

# --- 2. TLS + tokens -----------------------------------------------------------------------------
start() { start_server "${model}" --slots 2 --threads 2 "$@"; }
stop() { stop_server; }

start --tls_cert "${certs}/server.crt" --tls_key "${certs}/server.key" \
  --auth_tokens_file "${tmp}/tokens" --health_port 0 --auth_tokens_reload_interval 200ms
grep -q "polysketch-server: TLS, bearer tokens: 1" "${tmp}/server.log" \
  || fail "no security line in the log"
# The tokens file was written with the default umask (0644): the log says so; the key (0600)
# draws no warning.
grep -q "warning: --auth_tokens_file ${tmp}/tokens is readable by every user" "${tmp}/server.log" \
  || fail "no warning about the world-readable tokens file"
grep -q "warning: --tls_key" "${tmp}/server.log" && fail "a warning about the 0600 key"
[[ "${health_port}" =~ ^[0-9]+$ ]] || fail "no health port in the ready line"
tls=(--target "localhost:${port}" --tls_ca "${certs}/ca.crt" --timeout 60s)
gen=(generate --prompt "In the beginning" --max_new_tokens 16 --temperature 0)

"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/alice.token" > "${tmp}/out.txt" \
  2> "${tmp}/err.txt" || fail "cli over TLS with a token: $(cat "${tmp}/err.txt")"
[[ -s "${tmp}/out.txt" ]] || fail "cli over TLS printed no text"
grep -q "generated_tokens=16" "${tmp}/err.txt" || fail "cli: $(cat "${tmp}/err.txt")"
# --server_name: the certificate names localhost and 127.0.0.1, not "example.invalid".
"${cli}" "${gen[@]}" --target "127.0.0.1:${port}" --tls_ca "${certs}/ca.crt" --timeout 60s \
  --token "${alice}" --server_name localhost > /dev/null 2> "${tmp}/err.txt" \
  || fail "cli with --server_name localhost: $(cat "${tmp}/err.txt")"
echo "ok: cli over TLS with --token_file and --token/--server_name"

set +e
"${cli}" "${gen[@]}" "${tls[@]}" > /dev/null 2> "${tmp}/err.txt"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q "UNAUTHENTICATED: missing credentials" "${tmp}/err.txt" \
  || fail "cli without a token: rc ${rc}: $(cat "${tmp}/err.txt")"
"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/wrong.token" > /dev/null 2> "${tmp}/err.txt"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q "UNAUTHENTICATED: invalid credentials" "${tmp}/err.txt" \
  || fail "cli with a wrong token: rc ${rc}: $(cat "${tmp}/err.txt")"
grep -q "${wrong}" "${tmp}/err.txt" "${tmp}/server.log" && fail "the wrong token was echoed"
"${cli}" info "${tls[@]}" > /dev/null 2> "${tmp}/err.txt"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q "UNAUTHENTICATED" "${tmp}/err.txt" \
  || fail "cli info without a token: rc ${rc}: $(cat "${tmp}/err.txt")"
# Plaintext to the TLS port: no connection.
"${cli}" "${gen[@]}" --target "127.0.0.1:${port}" --token "${alice}" --timeout 10s > /dev/null \
  2> "${tmp}/err.txt"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q "UNAVAILABLE" "${tmp}/err.txt" \
  || fail "plaintext cli against TLS: rc ${rc}: $(cat "${tmp}/err.txt")"
set -e
health="$("${cli}" health "${tls[@]}")" || fail "cli health over TLS without a token: ${health}"
[[ "$(grep -c ": SERVING$" <<< "${health}")" -eq 2 ]] || fail "cli health: ${health}"
health="$("${cli}" health --target "127.0.0.1:${health_port}" --timeout 10s)" \
  || fail "plaintext health on --health_port: ${health}"
[[ "$(grep -c ": SERVING$" <<< "${health}")" -eq 2 ]] || fail "health port: ${health}"
set +e
"${cli}" "${gen[@]}" --target "127.0.0.1:${health_port}" --token "${alice}" --timeout 10s \
  > /dev/null 2> "${tmp}/err.txt"
rc=$?
set -e
[[ ${rc} -eq 1 ]] && grep -q "UNIMPLEMENTED" "${tmp}/err.txt" \
  || fail "the health port serves GenerationService: rc ${rc}: $(cat "${tmp}/err.txt")"
echo "ok: missing / wrong token UNAUTHENTICATED, nothing echoed; health without a token;" \
  "plaintext refused; the probe port serves health only"

"${loadgen}" --target "localhost:${port}" --tls_ca "${certs}/ca.crt" --token_file \
  "${tmp}/alice.token" --concurrency 2 --num_requests 4 --prompt_bytes 32 --max_new_tokens 8 \
  --timeout 60s --json > "${tmp}/load.json" 2> "${tmp}/load.txt" \
  || fail "loadgen over TLS: $(cat "${tmp}/load.txt")"
"${python}" -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["ok"] == 4, r' \
  "${tmp}/load.json" || fail "loadgen report: $(cat "${tmp}/load.json")"
echo "ok: loadgen over TLS with a token"

[[ -f "${build}/python/polysketch_client/_proto/generation_pb2_grpc.py" ]] \
  || fail "no Python stubs in ${build}/python (build the polysketch_client_py target)"
PYTHONPATH="${build}/python" "${python}" - "localhost:${port}" "${certs}" "${tmp}" << 'PY' \
  || fail "Python client over TLS"
import sys
from polysketch_client import PolysketchClient, PolysketchError

target, certs, tmp = sys.argv[1:4]
ca = f"{certs}/ca.crt"
with PolysketchClient(target, timeout=60, tls_ca=ca, token_file=f"{tmp}/alice.token") as c:
    r = c.generate("In the beginning", max_new_tokens=12, temperature=0.0)
    assert r.final.generated_tokens == 12 and r.text, r
    chunks = list(c.generate_stream("In the beginning", max_new_tokens=12, temperature=0.0))
    assert "".join(x.text for x in chunks) == r.text
    assert c.model_info().name == "polysketch-learned-local"
    session = c.open_session()  # session calls carry the token too
    c.close_session(session)
for kwargs, want in (({}, "missing credentials"),
                     ({"token": open(f"{tmp}/wrong.token").read().strip()}, "invalid credentials")):
    with PolysketchClient(target, timeout=60, tls_ca=ca, **kwargs) as c:
        assert c.health("") == "SERVING"  # probes need no token
        try:
            c.open_session()
            raise AssertionError(f"a session opened with {kwargs}")
        except PolysketchError as e:
            assert e.code == "UNAUTHENTICATED", e
        try:
            c.generate("x", max_new_tokens=2)
            raise AssertionError(f"accepted with {kwargs}")
        except PolysketchError as e:
            assert e.code == "UNAUTHENTICATED" and want in e.details, e
            assert "X" not in e.details, e
# Server reflection needs no token either: list_services (field 7) over the raw method.
import grpc
with open(ca, "rb") as f:
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()))
reflect = channel.stream_stream(
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    request_serializer=lambda b: b, response_deserializer=lambda b: b)
reply = next(iter(reflect(iter([b"\x3a\x00"]), timeout=10)))
assert b"polysketch.v1.GenerationService" in reply, reply
channel.close()
print("ok: Python client over TLS: token accepted, missing / wrong refused, health and "
      "reflection open")
PY
out="$(PYTHONPATH="${build}/python" "${python}" -m polysketch_client --target "localhost:${port}" \
  --tls_ca "${certs}/ca.crt" --token_file "${tmp}/alice.token" generate \
  --prompt "In the beginning" --max_new_tokens 16 --temperature 0 2> /dev/null)" \
  || fail "python -m polysketch_client over TLS"
[[ "${out}" == "$(cat "${tmp}/out.txt")" ]] || fail "Python CLI text differs from the C++ CLI's"
echo "ok: python -m polysketch_client over TLS == polysketch-cli"

# --- 3. SIGHUP reload ----------------------------------------------------------------------------
wait_log() {  # wait_log <text>
  for _ in $(seq 1 100); do
    grep -qF -- "$1" "${tmp}/server.log" && return 0
    sleep 0.05
  done
  fail "no '$1' in the server log"
}
printf 'bob:%s\n' "${bob}" > "${tmp}/tokens"
kill -HUP "${pid}"
wait_log "SIGHUP: reloaded 1 bearer tokens"
"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/bob.token" > /dev/null 2> "${tmp}/err.txt" \
  || fail "bob's token after the reload: $(cat "${tmp}/err.txt")"
set +e
"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/alice.token" > /dev/null 2> "${tmp}/err.txt"
rc=$?
set -e
[[ ${rc} -eq 1 ]] && grep -q UNAUTHENTICATED "${tmp}/err.txt" \
  || fail "alice's removed token still works: rc ${rc}: $(cat "${tmp}/err.txt")"
printf 'bob %s\n' "${bob}" > "${tmp}/tokens"  # broken: a space instead of ':'
kill -HUP "${pid}"
wait_log "SIGHUP: reload failed, keeping 1 tokens: ${tmp}/tokens: line 1"
grep -q "${bob}" "${tmp}/server.log" && fail "the log echoes a token"
"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/bob.token" > /dev/null 2> "${tmp}/err.txt" \
  || fail "bob's token after a failed reload: $(cat "${tmp}/err.txt")"
echo "ok: SIGHUP adds and removes tokens; a broken file keeps the old ones"

# Without a signal: the file changes, the poll (every 200 ms) reloads it.
changed="tokens file changed: reloaded 1 bearer tokens"
before="$(grep -cF "${changed}" "${tmp}/server.log" || true)"
printf 'alice:%s\n' "${alice}" > "${tmp}/tokens"
for _ in $(seq 1 100); do
  [[ "$(grep -cF "${changed}" "${tmp}/server.log" || true)" -gt "${before}" ]] && break
  sleep 0.05
done
[[ "$(grep -cF "${changed}" "${tmp}/server.log" || true)" -gt "${before}" ]] \
  || fail "the changed tokens file was not reloaded"
"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/alice.token" > /dev/null 2> "${tmp}/err.txt" \
  || fail "alice's token after the polled reload: $(cat "${tmp}/err.txt")"
set +e
"${cli}" "${gen[@]}" "${tls[@]}" --token_file "${tmp}/bob.token" > /dev/null 2> "${tmp}/err.txt"
rc=$?
set -e
[[ ${rc} -eq 1 ]] && grep -q UNAUTHENTICATED "${tmp}/err.txt" \
  || fail "bob's token after the polled reload removed it: rc ${rc}: $(cat "${tmp}/err.txt")"
echo "ok: --auth_tokens_reload_interval reloads a changed file"

failures="$("${python}" -c '
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(re.search(r"^polysketch_auth_failures_total (\S+)$", text, re.M).group(1))
' "${metrics_port}")" || fail "cannot scrape /metrics"
# Refused above: cli without a token, with a wrong one, info without one, two Python clients
# (Generate and OpenSession each), alice after her removal, bob after his.
"${python}" -c "import sys; assert float(sys.argv[1]) == 9, sys.argv[1]" "${failures}" \
  || fail "polysketch_auth_failures_total is '${failures}', want 9"
echo "ok: polysketch_auth_failures_total ${failures}"
stop

# --- 4. Mutual TLS -------------------------------------------------------------------------------
start --tls_cert "${certs}/server.crt" --tls_key "${certs}/server.key" \
  --tls_client_ca "${certs}/ca.crt"
grep -q "mutual TLS" "${tmp}/server.log" || fail "no mutual TLS in the log"
tls=(--target "localhost:${port}" --tls_ca "${certs}/ca.crt" --timeout 10s)
set +e
"${cli}" "${gen[@]}" "${tls[@]}" > /dev/null 2> "${tmp}/err.txt"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q UNAVAILABLE "${tmp}/err.txt" \
  || fail "mTLS without a client certificate: rc ${rc}: $(cat "${tmp}/err.txt")"
"${cli}" "${gen[@]}" "${tls[@]}" --tls_cert "${certs}/rogue-client.crt" \
  --tls_key "${certs}/rogue-client.key" > /dev/null 2> "${tmp}/err.txt"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q UNAVAILABLE "${tmp}/err.txt" \
  || fail "mTLS with another CA's certificate: rc ${rc}: $(cat "${tmp}/err.txt")"
"${cli}" health "${tls[@]}" > /dev/null 2>&1
rc=$?
[[ ${rc} -eq 1 ]] || fail "mTLS health without a client certificate: rc ${rc}"
set -e
"${cli}" "${gen[@]}" "${tls[@]}" --tls_cert "${certs}/client.crt" --tls_key "${certs}/client.key" \
  > /dev/null 2> "${tmp}/err.txt" \
  || fail "mTLS with the client certificate: $(cat "${tmp}/err.txt")"
PYTHONPATH="${build}/python" "${python}" - "localhost:${port}" "${certs}" << 'PY' \
  || fail "Python client over mutual TLS"
import sys
from polysketch_client import PolysketchClient, PolysketchError

target, certs = sys.argv[1:3]
with PolysketchClient(target, timeout=30, tls_ca=f"{certs}/ca.crt",
                      tls_cert=f"{certs}/client.crt", tls_key=f"{certs}/client.key") as c:
    assert c.generate("Hi", max_new_tokens=4).final.generated_tokens == 4
with PolysketchClient(target, timeout=10, tls_ca=f"{certs}/ca.crt") as c:
    try:
        c.generate("Hi", max_new_tokens=4)
        raise AssertionError("mTLS call without a client certificate succeeded")
    except PolysketchError as e:
        assert e.code == "UNAVAILABLE", e
print("ok: Python client over mutual TLS; refused without a certificate")
PY
echo "ok: mutual TLS (C++ CLI and Python client)"
stop

# --- 5. Connection limits ------------------------------------------------------------------------
# Sessions off: with them the server raises the message limit to one state (ImportState).
start --max_concurrent_streams 1 --max_receive_message_bytes 65536 --max_new_tokens_limit 1000000 \
  --session_budget_bytes 0
PYTHONPATH="${build}/python" "${python}" - "127.0.0.1:${port}" << 'PY' || fail "connection limits"
import socket, struct, sys, time
import grpc
from polysketch_client._proto import generation_pb2 as pb, generation_pb2_grpc as pbg

target = sys.argv[1]
stub = pbg.GenerationServiceStub(grpc.insecure_channel(target))
def request(text, n):
    return pb.GenerateRequest(text=text, max_new_tokens=n)
def code(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"

got = code(lambda: stub.Generate(request(b"a" * 70000, 2), timeout=10))
assert got.startswith("RESOURCE_EXHAUSTED") and "65536" in got, got
running = stub.GenerateStream(request(b"Hi", 1000000), timeout=60)
next(running)
got = code(lambda: stub.Generate(request(b"Hi", 2), timeout=1.5))
assert got.startswith("DEADLINE_EXCEEDED"), f"a second stream ran beside the first: {got}"
running.cancel()
got = code(lambda: stub.Generate(request(b"Hi", 2), timeout=10))
assert got == "OK", got
print("ok: --max_receive_message_bytes and --max_concurrent_streams")

# PINGs without data, faster than --keepalive_min_client_ping_interval (10 s): after
# --keepalive_max_ping_strikes (2) the server sends GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
host, port = target.rsplit(":", 1)
sock = socket.create_connection((host, int(port)), timeout=5)
def frame(kind, flags, payload=b""):  # on stream 0
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags, 0, 0, 0, 0]) + payload
sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0))
sock.settimeout(0.2)
buffer, goaway, pings = b"", None, 0
while goaway is None and pings < 40:
    sock.sendall(frame(6, 0, struct.pack(">Q", pings)))
    pings += 1
    try:
        data = sock.recv(65536)
        if not data:
            break
        buffer += data
    except socket.timeout:
        pass
    while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
        n = int.from_bytes(buffer[:3], "big")
        kind, flags, payload = buffer[3], buffer[4], buffer[9:9 + n]
        buffer = buffer[9 + n:]
        if kind == 4 and not flags & 1:
            sock.sendall(frame(4, 1))  # SETTINGS ack
        if kind == 7:
            goaway = payload
    time.sleep(0.05)
assert goaway is not None, f"no GOAWAY after {pings} pings"
error = int.from_bytes(goaway[4:8], "big")
assert error == 0xB and goaway[8:] == b"too_many_pings", (hex(error), goaway[8:])
print(f"ok: GOAWAY too_many_pings after {pings} pings")
PY
stop
echo "PASS: security_binary_test"
