#!/usr/bin/env bash
# The HTTP API of the server binary with the clients people use, over TLS with a bearer token
# (the gRPC port's --tls_cert / --tls_key / --auth_tokens_file):
#   curl: health without a token, 401 without one elsewhere, a completion, a stream read line by
#         line (every line an event or blank, [DONE] last), the refusals (400 naming the field,
#         404 unknown model, 413 huge body, malformed JSON), plaintext refused on the TLS port;
#   the official openai npm client (scripts/setup-node installs it): completions and chat, whole
#         and streamed, logprobs, models, errors, an abandoned stream (openai_client_test.mjs);
#   both equal to the gRPC API's text for the same seed (polysketch-cli);
#   the metrics tell the two APIs apart; slots back to zero; SIGTERM drains.
# Usage: http_binary_test.sh <polysketch-server> <polysketch-cli> <repo root>
set -euo pipefail
server="$1"
cli="$2"
root="$3"
# shellcheck source=tests/testing/server_process.sh
source "${root}/tests/testing/server_process.sh"
node_dir="${root}/tests/server/http/node"
[[ -f "${node_dir}/node_modules/openai/package.json" ]] \
  || fail "the openai npm client is not installed: run scripts/setup-node"
command -v curl > /dev/null || fail "no curl (scripts/setup-deps installs it)"

certs="${tmp}/certs"
bash "${root}/tests/testing/make_test_certs.sh" "${certs}" > /dev/null 2>&1 \
  || fail "make_test_certs.sh failed"
token="alice-$(openssl rand -hex 16)"
printf 'alice:%s\n' "${token}" > "${tmp}/tokens"
chmod 600 "${tmp}/tokens"
printf '%s\n' "${token}" > "${tmp}/token"
model="${root}/models/tiny-polysketch"
start_server "${model}" --slots 2 --threads 2 --tls_cert "${certs}/server.crt" \
  --tls_key "${certs}/server.key" --auth_tokens_file "${tmp}/tokens"
[[ "${http_port}" =~ ^[0-9]+$ ]] || fail "no HTTP line in the log"
grep -q "polysketch-server: HTTP on 127.0.0.1:${http_port} (OpenAI API, TLS, chat template default)" \
  "${tmp}/server.log" || fail "HTTP line: $(grep HTTP "${tmp}/server.log")"
base="https://localhost:${http_port}"
curl_tls=(curl -sS --cacert "${certs}/ca.crt" --max-time 60)
auth=(-H "Authorization: Bearer ${token}")
name="tiny-polysketch"

# status BODY_FILE CURL_ARGS...: the HTTP status of the call, its body into BODY_FILE.
status() {
  local out="$1"
  shift
  "${curl_tls[@]}" -o "${out}" -w '%{http_code}' "$@"
}

# --- curl ----------------------------------------------------------------------------------------
[[ "$(status "${tmp}/h.json" "${base}/health")" == 200 ]] || fail "health: $(cat "${tmp}/h.json")"
grep -q '"status":"ok"' "${tmp}/h.json" || fail "health body: $(cat "${tmp}/h.json")"
[[ "$(status "${tmp}/e.json" "${base}/v1/models")" == 401 ]] || fail "models without a token"
grep -q '"code":"invalid_api_key"' "${tmp}/e.json" || fail "401 body: $(cat "${tmp}/e.json")"
grep -q "${token}" "${tmp}/e.json" "${tmp}/server.log" && fail "the token was echoed"
[[ "$(status "${tmp}/m.json" "${auth[@]}" "${base}/v1/models")" == 200 ]] || fail "models"
grep -q "\"id\":\"${name}\"" "${tmp}/m.json" || fail "models: $(cat "${tmp}/m.json")"
echo "ok: curl over TLS: health without a token, 401 without one, models with one"

request='{"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 1, "top_k": 50, "seed": 11}'
[[ "$(status "${tmp}/c.json" "${auth[@]}" -H 'Content-Type: application/json' -d "${request}" \
  "${base}/v1/completions")" == 200 ]] || fail "completion: $(cat "${tmp}/c.json")"
curl_text="$(/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"], end="")' \
  < "${tmp}/c.json")"
[[ -n "${curl_text}" ]] || fail "completion without text: $(cat "${tmp}/c.json")"

# A stream, read line by line as it arrives: events and blank lines only, [DONE] last.
stream_request='{"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 1, "top_k": 50, "seed": 11, "stream": true}'
events=0
done_seen=0
streamed=""
while IFS= read -r line; do
  [[ -z "${line}" ]] && continue
  [[ ${done_seen} -eq 0 ]] || fail "a line after [DONE]: ${line}"
  [[ "${line}" == "data: "* ]] || fail "not an event line: ${line}"
  if [[ "${line}" == "data: [DONE]" ]]; then
    done_seen=1
    continue
  fi
  events=$((events + 1))
  streamed+="$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1][6:])["choices"][0]["text"], end="")' "${line}")"
done < <("${curl_tls[@]}" -N "${auth[@]}" -H 'Content-Type: application/json' \
  -d "${stream_request}" "${base}/v1/completions")
[[ ${done_seen} -eq 1 ]] || fail "the stream did not end with data: [DONE]"
((events > 2)) || fail "only ${events} events"
[[ "${streamed}" == "${curl_text}" ]] || fail "stream '${streamed}' != whole '${curl_text}'"
echo "ok: curl stream read line by line: ${events} events then [DONE], same text as whole"

expect_error() {  # expect_error STATUS SUBSTRING CURL_ARGS...
  local want="$1" substring="$2"
  shift 2
  local got
  got="$(status "${tmp}/err.json" "${auth[@]}" -H 'Content-Type: application/json' "$@")"
  [[ "${got}" == "${want}" ]] || fail "$*: status ${got}, want ${want}: $(cat "${tmp}/err.json")"
  grep -qF -- "${substring}" "${tmp}/err.json" || fail "$*: no '${substring}' in $(cat "${tmp}/err.json")"
}
expect_error 400 '"param":"top_p"' -d '{"prompt": "x", "top_p": 0}' "${base}/v1/completions"
expect_error 400 '"param":"temperature"' -d '{"prompt": "x", "temperature": "hot"}' \
  "${base}/v1/completions"
expect_error 400 'body: not valid JSON' -d '{"prompt": "x", ' "${base}/v1/completions"
expect_error 400 'messages[0].role' -d '{"messages": [{"role": "robot", "content": "x"}]}' \
  "${base}/v1/chat/completions"
expect_error 404 '"code":"model_not_found"' -d '{"prompt": "x", "model": "gpt-4"}' \
  "${base}/v1/completions"
expect_error 404 'no such endpoint' -d '{}' "${base}/v1/engines"
head -c $((9 << 20)) /dev/zero | tr '\0' 'a' > "${tmp}/huge.json"
expect_error 413 '"code":"request_too_large"' --data-binary "@${tmp}/huge.json" \
  "${base}/v1/completions"
echo "ok: curl refusals: 400 naming the field, malformed JSON, 404 model and path, 413"

set +e
curl -sS --max-time 10 "http://127.0.0.1:${http_port}/health" > /dev/null 2>&1
rc=$?
set -e
[[ ${rc} -ne 0 ]] || fail "plaintext HTTP to the TLS port answered"
echo "ok: plaintext refused on the TLS port"

# --- The openai npm client, and the gRPC API for the same seed -----------------------------------
NODE_EXTRA_CA_CERTS="${certs}/ca.crt" timeout 120 node "${node_dir}/openai_client_test.mjs" \
  "${base}/v1" "${token}" "${name}" > "${tmp}/node.json" 2> "${tmp}/node.err" \
  || fail "openai client: $(cat "${tmp}/node.err") $(cat "${tmp}/node.json")"
field() { /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]], end='')" "$@"; }
node_text="$(field "${tmp}/node.json" completion)"
node_chat="$(field "${tmp}/node.json" chat)"
echo "ok: openai npm client: completions and chat, whole == streamed, logprobs, models, errors"

grpc=(--target "localhost:${port}" --tls_ca "${certs}/ca.crt" --token_file "${tmp}/token"
  --timeout 60s --unary)
grpc_text="$("${cli}" generate "${grpc[@]}" --prompt "The quick brown fox" --max_new_tokens 24 \
  --temperature 1 --top_k 50 --seed 11 2> "${tmp}/cli.err")" || fail "cli: $(cat "${tmp}/cli.err")"
[[ "${grpc_text}" == "${curl_text}" ]] || fail "gRPC '${grpc_text}' != curl '${curl_text}'"
[[ "${grpc_text}" == "${node_text}" ]] || fail "gRPC '${grpc_text}' != openai client '${node_text}'"
# Chat is the default template's prompt and stop string through gRPC.
grpc_chat="$("${cli}" generate "${grpc[@]}" --prompt $'User: Who made the light?\nAssistant:' \
  --stop '\nUser:' --max_new_tokens 24 --temperature 1 --top_k 50 --seed 11 \
  2> "${tmp}/cli.err")" || fail "cli chat: $(cat "${tmp}/cli.err")"
[[ "${grpc_chat}" == "${node_chat}" ]] || fail "gRPC chat '${grpc_chat}' != openai '${node_chat}'"
echo "ok: the same seed gives the same text over gRPC, curl and the openai client: '${grpc_text}'"

# --- Metrics by API, slots back to zero, drain -----------------------------------------------------
metrics="$(curl -sS "http://127.0.0.1:${metrics_port}/metrics")"
grep -q 'polysketch_api_requests_total{api="http",code="200",endpoint="completions"}' <<< "${metrics}" \
  || fail "no http completions in the metrics"
grep -q 'polysketch_api_requests_total{api="http",code="401",endpoint="models"}' <<< "${metrics}" \
  || fail "no http 401 in the metrics"
grep -q 'polysketch_api_requests_total{api="grpc",code="OK",endpoint="Generate"}' <<< "${metrics}" \
  || fail "no grpc Generate in the metrics"
for _ in $(seq 1 100); do
  used="$(curl -sS "http://127.0.0.1:${metrics_port}/metrics" | sed -nE 's/^polysketch_state_slots_used ([0-9.e+]+)$/\1/p')"
  [[ "${used}" == 0 ]] && break
  sleep 0.1
done
[[ "${used}" == 0 ]] || fail "slots in use after the clients left: ${used}"
echo "ok: metrics tell the APIs apart; slots back to 0"
stop_server
grep -q "stopped (drained)" "${tmp}/server.log" || fail "no clean drain"
echo "PASS"
