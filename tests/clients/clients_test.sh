#!/usr/bin/env bash
# The clients against a real polysketch-server over loopback: polysketch-cli (generate streaming
# and --unary agree at temperature 0; info, health, tokenize, cancel; exit 2 on a bad flag, 1 with
# INVALID_ARGUMENT on a bad field; scoring a prompt with --prompt_logprobs), polysketch-loadgen
# (16 requests at concurrency 4, all ok, with latency percentiles; the same over --api http),
# the Python client package built into <build dir>/python (prompt log-probabilities included),
# and the eval tool built beside it (python3 -m polysketch_eval passkey; its perplexity is
# tests/python/test_eval_server.py).
# Usage: clients_test.sh <polysketch-server> <polysketch-cli> <polysketch-loadgen> <repo root>
#        <build dir>
set -euo pipefail
server="$1"
cli="$2"
loadgen="$3"
root="$4"
build="$5"
python=/usr/bin/python3
# shellcheck source=tests/testing/server_process.sh
source "${root}/tests/testing/server_process.sh"

# --- Start the server on free ports; its ready line gives them. -------------------------------
model="${root}/tests/golden/polysketch-learned-local"
start_server "${model}" --slots 4
target="127.0.0.1:${port}"

# --- polysketch-cli ------------------------------------------------------------------------------
gen_flags=(--target "${target}" --prompt "The quick brown fox" --max_new_tokens 24
  --temperature 0 --seed 7 --timeout 60s)
"${cli}" generate "${gen_flags[@]}" > "${tmp}/stream.txt" 2> "${tmp}/stream.err" \
  || fail "cli generate (stream) failed: $(cat "${tmp}/stream.err")"
"${cli}" generate --unary "${gen_flags[@]}" > "${tmp}/unary.txt" 2> "${tmp}/unary.err" \
  || fail "cli generate --unary failed: $(cat "${tmp}/unary.err")"
[[ -s "${tmp}/stream.txt" ]] || fail "cli generate printed no text"
cmp -s "${tmp}/stream.txt" "${tmp}/unary.txt" \
  || fail "stream and unary text differ: '$(cat "${tmp}/stream.txt")' '$(cat "${tmp}/unary.txt")'"
for f in stream unary; do
  for want in finish_reason=LENGTH generated_tokens=24 seed=7 first_token=; do
    grep -q "${want}" "${tmp}/${f}.err" || fail "${f}: no ${want} in: $(cat "${tmp}/${f}.err")"
  done
done
echo "ok: cli generate stream == unary: '$(cat "${tmp}/stream.txt")'"

# The server equals the offline engine (polysketch-generate) for the same prompt and seed, when
# sampling too (temperature 1, top-k 50, seed 11).
offline="${build}/polysketch-generate"
[[ -x "${offline}" ]] || fail "no ${offline} (scripts/build builds it)"
"${offline}" --model "${model}" --prompt "The quick brown fox" --max_new_tokens 40 \
  --temperature 1 --top_k 50 --seed 11 > "${tmp}/offline.txt" 2> "${tmp}/offline.err" \
  || fail "polysketch-generate failed: $(cat "${tmp}/offline.err")"
"${cli}" generate --target "${target}" --prompt "The quick brown fox" --max_new_tokens 40 \
  --temperature 1 --top_k 50 --seed 11 --timeout 60s > "${tmp}/served.txt" 2> "${tmp}/served.err" \
  || fail "cli generate (seeded) failed: $(cat "${tmp}/served.err")"
[[ -s "${tmp}/served.txt" ]] || fail "seeded generate printed no text"
cmp -s "${tmp}/offline.txt" "${tmp}/served.txt" \
  || fail "server != offline engine for seed 11: $(xxd -p "${tmp}/served.txt") vs $(xxd -p "${tmp}/offline.txt")"
echo "ok: served text == offline engine text for the same seed"

info="$("${cli}" info --target "${target}")" || fail "cli info failed"
grep -q "^name: *polysketch-learned-local$" <<< "${info}" || fail "cli info name: ${info}"
grep -q "^architecture: *polysketchformer$" <<< "${info}" || fail "cli info architecture: ${info}"
grep -q "^vocab_size: *256$" <<< "${info}" || fail "cli info vocab_size: ${info}"
grep -q "^attention_kinds: *polysketch,polysketch$" <<< "${info}" || fail "cli info kinds: ${info}"
grep -q "^limits.state_slots: *4$" <<< "${info}" || fail "cli info state_slots: ${info}"
echo "ok: cli info"

health="$("${cli}" health --target "${target}")" || fail "cli health failed: ${health}"
[[ "$(grep -c ": SERVING$" <<< "${health}")" -eq 2 ]] || fail "cli health: ${health}"
echo "ok: cli health"

tokens="$("${cli}" tokenize --target "${target}" --prompt "hello" 2> /dev/null)" \
  || fail "cli tokenize failed"
[[ "${tokens}" == "104 101 108 108 111" ]] || fail "cli tokenize: '${tokens}'"
echo "ok: cli tokenize"

set +e
"${cli}" generate --target "${target}" --no_such_flag 1 > /dev/null 2> "${tmp}/err"
rc=$?
[[ ${rc} -eq 2 ]] || fail "cli with a bad flag exited ${rc}, want 2"
"${cli}" frobnicate --target "${target}" > /dev/null 2> "${tmp}/err"
rc=$?
[[ ${rc} -eq 2 ]] || fail "cli with a bad subcommand exited ${rc}, want 2"
"${cli}" generate --target "${target}" --prompt "x" --temperature=-1 > /dev/null 2> "${tmp}/err"
rc=$?
[[ ${rc} -eq 1 ]] || fail "cli with --temperature=-1 exited ${rc}, want 1"
grep -q "INVALID_ARGUMENT" "${tmp}/err" || fail "no INVALID_ARGUMENT: $(cat "${tmp}/err")"
grep -q "temperature" "${tmp}/err" || fail "the error does not name the field: $(cat "${tmp}/err")"
"${cli}" generate --unary --target "${target}" --prompt "x" --top_p 1.5 > /dev/null 2> "${tmp}/err"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q "INVALID_ARGUMENT" "${tmp}/err" \
  || fail "cli --unary --top_p 1.5: rc ${rc}: $(cat "${tmp}/err")"
"${cli}" cancel --target "${target}" --request_id no-such-request > /dev/null 2> "${tmp}/err"
rc=$?
[[ ${rc} -eq 1 ]] && grep -q "NOT_FOUND" "${tmp}/err" \
  || fail "cli cancel of an unknown id: rc ${rc}: $(cat "${tmp}/err")"
set -e
echo "ok: cli exit codes (2 usage, 1 INVALID_ARGUMENT / NOT_FOUND)"

# Cancel a running stream by id. The stream may finish before Cancel reaches it (then Cancel is
# NOT_FOUND); when Cancel succeeds the stream must end cancelled: a final message with
# FINISH_REASON_CANCELLED (as the proto describes) or the gRPC status CANCELLED.
max_new="$(sed -n 's/^limits.max_new_tokens: *//p' <<< "${info}")"
"${cli}" generate --target "${target}" --prompt "Once upon a time" --max_new_tokens "${max_new}" \
  --request_id cli-cancel-me --timeout 60s > /dev/null 2> "${tmp}/long.err" &
long_pid=$!
cancelled=0
for _ in $(seq 1 50); do
  if "${cli}" cancel --target "${target}" --request_id cli-cancel-me > /dev/null 2>&1; then
    cancelled=1
    break
  fi
  kill -0 "${long_pid}" 2> /dev/null || break
  sleep 0.1
done
wait "${long_pid}" || true
if [[ ${cancelled} -eq 1 ]]; then
  grep -q -e "finish_reason=CANCELLED" -e "GenerateStream failed: CANCELLED" "${tmp}/long.err" \
    || fail "cancelled stream did not end CANCELLED: $(cat "${tmp}/long.err")"
  echo "ok: cli cancel mid-stream"
else
  echo "note: the stream ended before cancel reached it: $(tail -2 "${tmp}/long.err" | tr '\n' ' ')"
fi

# --- polysketch-loadgen --------------------------------------------------------------------------
"${loadgen}" --target "${target}" --concurrency 4 --num_requests 16 --prompt_bytes 64 \
  --max_new_tokens 16 --timeout 120s --json > "${tmp}/load.json" 2> "${tmp}/load.txt" \
  || fail "loadgen failed: $(cat "${tmp}/load.txt")"
cat "${tmp}/load.txt"
"${python}" - "${tmp}/load.json" << 'PY' || fail "loadgen report: $(cat "${tmp}/load.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["sent"] == 16 and r["ok"] == 16 and r["errors"] == 0, r
assert r["generated_tokens"] == 16 * 16, r
assert r["requests_per_second"] > 0 and r["generated_tokens_per_second"] > 0, r
for key in ("ttft_seconds", "tpot_seconds", "e2e_seconds"):
    d = r[key]
    # TPOT may be 0 when a request's tokens all arrive in one message.
    low = 0 if key == "tpot_seconds" else 1e-9
    assert d["count"] == 16 and low <= d["p50"] <= d["p90"] <= d["p99"], (key, d)
# Tokens that arrive in one message with the first have no gap of their own.
itl = r["itl_seconds"]
assert itl["count"] <= 16 * 15 and itl["p50"] <= itl["p90"] <= itl["p99"], itl
PY
grep -q "time to first token .*p50.*p90.*p99" "${tmp}/load.txt" || fail "no TTFT percentiles"
grep -q "inter-token latency .*p50.*p90.*p99" "${tmp}/load.txt" || fail "no ITL percentiles"
echo "ok: loadgen 16 requests at concurrency 4"

# The same load through the HTTP API (streamed /v1/completions).
[[ "${http_port}" =~ ^[0-9]+$ ]] || fail "no HTTP port in the server log"
"${loadgen}" --api http --http_target "127.0.0.1:${http_port}" --concurrency 4 --num_requests 16 \
  --prompt_bytes 64 --max_new_tokens 16 --json > "${tmp}/http.json" 2> "${tmp}/http.txt" \
  || fail "loadgen --api http failed: $(cat "${tmp}/http.txt")"
"${python}" - "${tmp}/http.json" << 'PY' || fail "loadgen --api http: $(cat "${tmp}/http.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["api"] == "http" and r["sent"] == 16 and r["ok"] == 16 and r["errors"] == 0, r
assert r["generated_tokens"] == 16 * 16 and r["prompt_tokens"] == 16 * 64, r
for key in ("ttft_seconds", "tpot_seconds", "e2e_seconds"):
    d = r[key]
    # TPOT may be 0 when a stream's events all arrive in one read.
    low = 0 if key == "tpot_seconds" else 1e-9
    assert d["count"] == 16 and low <= d["p50"] <= d["p90"] <= d["p99"], (key, d)
assert r["ttft_seconds"]["max"] <= r["e2e_seconds"]["max"], r
PY
set +e
"${loadgen}" --api http --rate 2 > /dev/null 2> "${tmp}/usage.txt"
rc=$?
set -e
[[ ${rc} -eq 2 ]] && grep -q -- "--api http takes --concurrency" "${tmp}/usage.txt" \
  || fail "loadgen --api http --rate: rc ${rc}: $(cat "${tmp}/usage.txt")"
echo "ok: loadgen --api http: 16 requests at concurrency 4, every figure"

# The soak mode: a duration, mixed prompt lengths, cancels at random points, deadlines that some
# requests miss, and codes that do not fail the run; every final status is counted by code.
"${loadgen}" --target "${target}" --concurrency 6 --duration 3s --prompt_bytes_min 8 \
  --prompt_bytes_max 4096 --max_new_tokens 64 --cancel_fraction 0.5 --timeout 0.5s \
  --expected_codes DEADLINE_EXCEEDED,RESOURCE_EXHAUSTED --json > "${tmp}/soak.json" \
  2> "${tmp}/soak.txt" || fail "loadgen (soak mode) failed: $(cat "${tmp}/soak.txt")"
"${python}" - "${tmp}/soak.json" << 'PY' || fail "loadgen soak report: $(cat "${tmp}/soak.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["prompt_bytes_min"] == 8 and r["prompt_bytes_max"] == 4096, r
statuses = r["statuses_by_code"]
assert sum(statuses.values()) == r["sent"] > 0, r  # every request has a final status
assert r["cancelled"] > 0 and statuses.get("CANCELLED", 0) >= r["cancelled"], r
assert r["errors"] == r["expected_errors"], r
assert set(r["errors_by_code"]) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, r
PY
grep -q "^final statuses: .*CANCELLED" "${tmp}/soak.txt" || fail "no final statuses line"
set +e
"${loadgen}" --target "${target}" --expected_codes NOT_A_CODE > /dev/null 2>&1
rc=$?
set -e
[[ ${rc} -eq 2 ]] || fail "loadgen --expected_codes NOT_A_CODE exited ${rc}, want 2"
echo "ok: loadgen soak mode"

# --- Python client -------------------------------------------------------------------------------
[[ -f "${build}/python/polysketch_client/_proto/generation_pb2_grpc.py" ]] \
  || fail "no Python stubs in ${build}/python (build the polysketch_client_py target)"
PYTHONPATH="${build}/python" "${python}" - "${target}" << 'PY' || fail "Python client"
import sys
from polysketch_client import PolysketchClient, PolysketchError

target = sys.argv[1]
with PolysketchClient(target, timeout=60) as client:
    params = dict(max_new_tokens=20, temperature=0.0, seed=11)
    unary = client.generate("Hello there", **params)
    chunks = list(client.generate_stream("Hello there", **params))
    streamed = "".join(c.text for c in chunks)
    assert unary.text == streamed and unary.text, (unary.text, streamed)
    assert chunks[-1].final is not None and all(c.final is None for c in chunks[:-1])
    for final in (unary.final, chunks[-1].final):
        assert final.finish_reason == "LENGTH", final
        assert final.generated_tokens == 20 and final.seed == 11, final
        assert final.prompt_tokens == len("Hello there"), final
    assert [t.token_id for t in unary.tokens] == [t.token_id for c in chunks for t in c.tokens]
    assert len(unary.tokens) == 20

    info = client.model_info()
    assert info.name == "polysketch-learned-local", info
    assert info.architecture == "polysketchformer", info
    assert info.attention_kinds == ["polysketch", "polysketch"], info
    assert (info.vocab_size, info.d_model, info.n_layers, info.n_heads) == (256, 32, 2, 2), info
    assert info.tokenizer == "bytes" and info.state_bytes_per_request > 0, info
    assert info.limits.state_slots == 4 and info.limits.max_context > 0, info

    assert client.health("") == "SERVING"
    assert client.health("polysketch.v1.GenerationService") == "SERVING"
    assert client.tokenize("hi") == [104, 105]

    try:
        client.generate("x", temperature=-1.0)
        raise AssertionError("temperature=-1 accepted")
    except PolysketchError as error:
        assert error.code == "INVALID_ARGUMENT" and "temperature" in error.details, error
    try:
        client.cancel("no-such-request")
        raise AssertionError("cancel of an unknown id succeeded")
    except PolysketchError as error:
        assert error.code == "NOT_FOUND", error
print("ok: Python client generate == generate_stream, model_info, health, tokenize, errors")
PY
PYTHONPATH="${build}/python" "${python}" - "${target}" << 'PY' || fail "Python client sessions"
import sys
from polysketch_client import PolysketchClient, PolysketchError

with PolysketchClient(sys.argv[1], timeout=60) as client:
    params = dict(max_new_tokens=12, temperature=0.0)
    session = client.open_session()
    first = client.generate("In the beginning", session_id=session, **params)
    second = client.generate(" and then", session_id=session, **params)
    assert second.final.cached_tokens == len("In the beginning") + 11, second.final
    # As token ids: the random fixture model's bytes need not be valid UTF-8 text.
    ids = lambda result: [t.token_id for t in result.tokens]
    history = list(b"In the beginning") + ids(first) + list(b" and then")
    whole = client.generate(history, **params)
    assert ids(second) == ids(whole), (ids(second), ids(whole))
    exported = client.export_state(session)
    assert exported.tokens == len("In the beginning") + 12 + len(" and then") + 12, exported.tokens
    copy = client.import_state(exported.state)
    a = client.generate(".", session_id=session, **params)
    b = client.generate(".", session_id=copy, **params)
    assert ids(a) == ids(b), (ids(a), ids(b))
    client.close_session(session)
    try:
        client.generate("x", session_id=session, **params)
        raise AssertionError("a closed session was accepted")
    except PolysketchError as error:
        assert error.code == "NOT_FOUND", error
    try:
        client.import_state(b"not a state")
        raise AssertionError("garbage imported")
    except PolysketchError as error:
        assert error.code == "INVALID_ARGUMENT", error
    # Session calls carry the session header (session-aware routing by a proxy); others do not.
    from polysketch_client.client import SESSION_HEADER
    assert (SESSION_HEADER, "abc") in client._metadata_for("abc")
    assert all(k != SESSION_HEADER for k, _ in client._metadata_for(""))
print("ok: Python client sessions: continuation == whole conversation, export/import, errors")
PY
# Prompt log-probabilities: scoring only (max_new_tokens=0) through **params, unary == stream,
# the stream's entries before its tokens, alternatives most likely first, the teacher-forced
# score of a token equal to the logprob the same token gets when it is generated, the default of
# an unset max_new_tokens, and the refusals.
PYTHONPATH="${build}/python" "${python}" - "${target}" << 'PY' || fail "Python prompt logprobs"
import sys
from polysketch_client import GenerateResult, PolysketchClient, PolysketchError, StreamChunk

prompt = "The quick brown fox"
with PolysketchClient(sys.argv[1], timeout=60) as client:
    score = dict(max_new_tokens=0, prompt_logprobs=True, prompt_top_logprobs=3)
    unary = client.generate(prompt, **score)
    assert isinstance(unary, GenerateResult)
    assert unary.final.finish_reason == "LENGTH" and unary.final.generated_tokens == 0, unary.final
    assert unary.tokens == [] and unary.text == "", unary
    entries = unary.prompt_logprobs
    assert [e.token_id for e in entries] == list(prompt.encode())[1:], entries
    for e in entries:
        assert e.logprob <= 0.0 and len(e.top_logprobs) == 3, e
        tops = [lp for _, lp in e.top_logprobs]
        assert tops == sorted(tops, reverse=True), e  # most likely first
        assert e.logprob <= tops[0] + 1e-6, e
        for tid, lp in e.top_logprobs:
            if tid == e.token_id:
                assert abs(lp - e.logprob) < 1e-6, e
    chunks = list(client.generate_stream(prompt, **dict(score, max_new_tokens=4)))
    assert all(isinstance(c, StreamChunk) for c in chunks)
    streamed = [e for c in chunks for e in c.prompt_logprobs]
    assert streamed == entries, (streamed, entries)
    first_token = next(i for i, c in enumerate(chunks) if c.tokens)
    assert all(not c.prompt_logprobs for c in chunks[first_token:]), chunks
    assert chunks[-1].final.generated_tokens == 4, chunks[-1].final
    # Teacher-forced score of the token greedy decoding picks == that token's sampled logprob.
    greedy = client.generate(prompt, max_new_tokens=1, temperature=0.0, logprobs=True)
    token = greedy.tokens[0]
    assert greedy.prompt_logprobs == []
    scored = client.generate(list(prompt.encode()) + [token.token_id], max_new_tokens=0,
                             prompt_logprobs=True)
    last = scored.prompt_logprobs[-1]
    assert last.token_id == token.token_id and abs(last.logprob - token.logprob) < 1e-4, (
        last, token)
    one = client.generate("A", **score)
    assert one.prompt_logprobs == [] and one.final.generated_tokens == 0, one
    # Unset max_new_tokens is not sent (the server's default); 0 is sent.
    assert not PolysketchClient._request("x").HasField("max_new_tokens")
    assert PolysketchClient._request("x", max_new_tokens=0).HasField("max_new_tokens")
    for bad, field in ((dict(prompt_logprobs=True, prompt_top_logprobs=21), "prompt_top_logprobs"),
                       (dict(prompt_top_logprobs=2), "prompt_top_logprobs"),
                       (dict(prompt_logprobs=True, session_id=client.open_session()),
                        "prompt_logprobs")):
        try:
            client.generate(prompt, max_new_tokens=0, **bad)
            raise AssertionError(f"{bad} accepted")
        except PolysketchError as error:
            assert error.code == "INVALID_ARGUMENT" and error.details.startswith(field + ":"), error
print("ok: Python client prompt logprobs (unary == stream, scoring only, top-n order, errors)")
PY
# The C++ CLI scores a prompt: one stderr line per prompt token, stream == unary, no text.
for mode in stream unary; do
  flags=(--target "${target}" --prompt "Hello" --max_new_tokens 0 --prompt_logprobs
    --prompt_top_logprobs 2 --timeout 60s)
  [[ "${mode}" == unary ]] && flags+=(--unary)
  "${cli}" generate "${flags[@]}" > "${tmp}/score_${mode}.txt" 2> "${tmp}/score_${mode}.err" \
    || fail "cli scoring (${mode}) failed: $(cat "${tmp}/score_${mode}.err")"
  [[ ! -s "${tmp}/score_${mode}.txt" ]] \
    || fail "cli scoring printed text: $(cat "${tmp}/score_${mode}.txt")"
  grep "^prompt\[" "${tmp}/score_${mode}.err" > "${tmp}/score_${mode}.lines" || true
  [[ "$(wc -l < "${tmp}/score_${mode}.lines")" -eq 4 ]] \
    || fail "cli scoring (${mode}): want 4 prompt lines: $(cat "${tmp}/score_${mode}.err")"
  grep -q "finish_reason=LENGTH prompt_tokens=5 generated_tokens=0" "${tmp}/score_${mode}.err" \
    || fail "cli scoring (${mode}) final: $(cat "${tmp}/score_${mode}.err")"
done
# "prompt[1] 101 'e' logprob -3.2 | 32 ' ':-1.1 | 97 'a':-1.9": the token, then 2 alternatives.
first_line="$(head -1 "${tmp}/score_stream.lines")"
grep -q "^prompt\[1\] 101 'e' logprob -[0-9]" <<< "${first_line}" \
  && [[ "$(grep -o ' | ' <<< "${first_line}" | wc -l)" -eq 2 ]] \
  || fail "cli scoring line format: ${first_line}"
cmp -s "${tmp}/score_stream.lines" "${tmp}/score_unary.lines" \
  || fail "cli scoring: stream and unary differ"
echo "ok: cli --prompt_logprobs --max_new_tokens 0 (stream == unary)"
"${loadgen}" --target "${target}" --scenario chat --turns 3 \
  --turn_bytes 300 --max_new_tokens 8 --sessions --json > "${tmp}/chat.txt" \
  || fail "loadgen chat scenario failed"
"${loadgen}" --target "${target}" --scenario shared_prefix --requests 4 \
  --system_bytes 600 --user_bytes 50 --max_new_tokens 8 --json > "${tmp}/shared.txt" \
  || fail "loadgen shared_prefix scenario failed"
"${python}" - "${tmp}/chat.txt" "${tmp}/shared.txt" << 'PY' || fail "loadgen scenario reports"
import json, sys
chat = json.loads(open(sys.argv[1]).read().splitlines()[-1])
assert chat["scenario"] == "chat" and chat["sessions"] and chat["failed"] == 0, chat
# Turn k (k >= 2) starts from the session: 300 bytes per turn + 8 tokens per reply before it,
# less the reply's last token, which the state has not seen yet and the new turn feeds first.
assert [r["cached_tokens"] for r in chat["requests"]] == [0, 307, 615], chat["requests"]
shared = json.loads(open(sys.argv[2]).read().splitlines()[-1])
assert shared["failed"] == 0 and len(shared["requests"]) == 4, shared
# The third and fourth requests restore the shared 600 bytes (cut to whole blocks) from the cache.
assert all(r["cached_tokens"] > 0 for r in shared["requests"][2:]), shared["requests"]
PY
echo "ok: loadgen chat and shared_prefix scenarios"

session="$("${cli}" open-session --target "${target}")" || fail "cli open-session failed"
[[ "${session}" =~ ^[0-9a-f]{32}$ ]] || fail "open-session printed '${session}'"
"${cli}" generate --target "${target}" --session "${session}" --prompt "Once" \
  --max_new_tokens 5 --temperature 0 > /dev/null 2> "${tmp}/session.err" \
  || fail "cli generate --session failed"
"${cli}" export-state --target "${target}" --session "${session}" \
  --state_file "${tmp}/state.bin" 2> /dev/null || fail "cli export-state failed"
[[ -s "${tmp}/state.bin" ]] || fail "export-state wrote nothing"
copy="$("${cli}" import-state --target "${target}" --state_file "${tmp}/state.bin")" \
  || fail "cli import-state failed"
"${cli}" generate --target "${target}" --session "${copy}" --prompt " more" --max_new_tokens 3 \
  --temperature 0 > /dev/null 2> "${tmp}/copy.err" || fail "generate on the imported session"
# 4 prompt tokens + 5 generated, less the last one (pending: fed with this turn).
grep -q "cached_tokens=8" "${tmp}/copy.err" || fail "imported session did not continue: $(cat "${tmp}/copy.err")"
"${cli}" close-session --target "${target}" --session "${session}" || fail "cli close-session"
if "${cli}" close-session --target "${target}" --session "${session}" 2> "${tmp}/closed.err"; then
  fail "closing a closed session succeeded"
fi
grep -q "NOT_FOUND" "${tmp}/closed.err" || fail "closed session: $(cat "${tmp}/closed.err")"
echo "ok: cli open-session, generate --session, export-state, import-state, close-session"
pycli=(env PYTHONPATH="${build}/python" "${python}" -m polysketch_client --target "${target}")
out="$("${pycli[@]}" generate --prompt "The quick brown fox" --max_new_tokens 24 \
  --temperature 0 --seed 7 2> /dev/null)" || fail "python -m polysketch_client generate failed"
[[ "${out}" == "$(cat "${tmp}/stream.txt")" ]] || fail "Python CLI text differs from the C++ CLI's"
"${pycli[@]}" health > /dev/null || fail "python -m polysketch_client health failed"
echo "ok: python -m polysketch_client"

# The eval tool as built (the package CMake copies): a small passkey grid, its JSON and table.
for _ in $(seq 1 12); do echo "And the LORD spake unto Moses, saying, Speak unto the children."; done \
  > "${tmp}/filler.txt"
PYTHONPATH="${build}/python" "${python}" -m polysketch_eval --target "${target}" --timeout 60 \
  passkey --data "${tmp}/filler.txt" --lengths 256,512 --depths 25,75 --keys 2 \
  --out "${tmp}/passkey.json" > "${tmp}/passkey.md" 2> "${tmp}/passkey.err" \
  || fail "python -m polysketch_eval passkey failed: $(cat "${tmp}/passkey.err")"
"${python}" - "${tmp}/passkey.json" << 'PY' || fail "passkey JSON: $(cat "${tmp}/passkey.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["eval"] == "passkey" and r["model"] == "polysketch-learned-local", r
cells = [(c["length"], c["depth"], c["trials"]) for c in r["cells"]]
assert cells == [(256, 25.0, 2), (256, 75.0, 2), (512, 25.0, 2), (512, 75.0, 2)], cells
for c in r["cells"]:
    for a in c["answers"]:
        assert a["correct"] == (a["extracted"] == a["key"]), a
PY
grep -q "^| 75% | " "${tmp}/passkey.md" || fail "passkey table: $(cat "${tmp}/passkey.md")"
grep -q "passkey L=512 depth=75%: ./2 correct" "${tmp}/passkey.err" \
  || fail "passkey progress: $(cat "${tmp}/passkey.err")"
set +e
PYTHONPATH="${build}/python" "${python}" -m polysketch_eval --target "${target}" passkey \
  --data "${tmp}/filler.txt" --depths 100 > /dev/null 2> "${tmp}/err"
rc=$?
set -e
[[ ${rc} -eq 2 ]] && grep -q "outside (0, 100)" "${tmp}/err" \
  || fail "polysketch_eval --depths 100: rc ${rc}: $(cat "${tmp}/err")"
echo "ok: python -m polysketch_eval passkey"

# --- Stop the server. ----------------------------------------------------------------------------
stop_server
echo "PASS: clients_test"
