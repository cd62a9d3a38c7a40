#!/usr/bin/env bash
# End-to-end checks of tools/polysketch_generate.cc: runs the built binary on the golden fixture
# model and the shipped tiny model, and feeds it bad flags.
#   polysketch_generate_test.sh <path to polysketch-generate> <repo root>
set -uo pipefail

bin="$1"
root="$2"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# Runs the binary, leaving stdout in ${tmp}/out, stderr in ${tmp}/err and the status in ${rc}.
run() {
  "${bin}" "$@" > "${tmp}/out" 2> "${tmp}/err"
  rc=$?
}

# 1. Greedy on the golden fixture reproduces the PyTorch reference's greedy continuation.
# The expected bytes are the first 10 greedy_tokens of
# tests/golden/polysketch-learned-local/golden.safetensors ([9, 9, 9, 106, 106, 106, 106, 213,
# 213, 213], read with train/modelio.py read_safetensors), decoded by Python's
# bytes.decode("utf-8", "replace"): each 0xD5 is a lead byte that the next one breaks, and the
# last is cut off by the end of the stream, so each becomes U+FFFD (EF BF BD).
printf 'In the beginning God created the heaven and the earth.' > "${tmp}/prompt.txt"
printf '\t\t\tjjjj\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd' > "${tmp}/expected"
run --model "${root}/tests/golden/polysketch-learned-local" --prompt_file "${tmp}/prompt.txt" \
  --max_new_tokens 10 --temperature 0
[[ ${rc} -eq 0 ]] || fail "greedy: exit ${rc}: $(cat "${tmp}/err")"
cmp -s "${tmp}/out" "${tmp}/expected" ||
  fail "greedy: stdout $(xxd -p "${tmp}/out") != expected $(xxd -p "${tmp}/expected")"
grep -q "finish reason: length" "${tmp}/err" || fail "greedy: no finish reason in stderr"

# 2. Same seed, same output at temperature 1.
model="${root}/models/tiny-polysketch"
run --model "${model}" --prompt "And God said" --max_new_tokens 30 --temperature 1 --seed 7
[[ ${rc} -eq 0 ]] || fail "seed: exit ${rc}: $(cat "${tmp}/err")"
cp "${tmp}/out" "${tmp}/seed_first"
run --model "${model}" --prompt "And God said" --max_new_tokens 30 --temperature 1 --seed 7
cmp -s "${tmp}/out" "${tmp}/seed_first" || fail "seed: two runs with --seed 7 differ"
[[ -s "${tmp}/seed_first" ]] || fail "seed: no output"

# 3. A missing model directory: exit 1, message names the path.
run --model "${tmp}/no-such-model" --prompt "x"
[[ ${rc} -eq 1 ]] || fail "missing model: exit ${rc}, want 1"
grep -q "^polysketch-generate: .*${tmp}/no-such-model" "${tmp}/err" ||
  fail "missing model: message does not name the path: $(cat "${tmp}/err")"

# 4. Both --prompt and --prompt_file, or neither: usage error, exit 2.
run --model "${model}" --prompt "x" --prompt_file "${tmp}/prompt.txt"
[[ ${rc} -eq 2 ]] || fail "both prompts: exit ${rc}, want 2"
run --model "${model}"
[[ ${rc} -eq 2 ]] || fail "no prompt: exit ${rc}, want 2"

# 5. A bad sampling value: exit 1 with SamplingParams::Validate's message.
run --model "${model}" --prompt "x" --top_p 0
[[ ${rc} -eq 1 ]] || fail "top_p 0: exit ${rc}, want 1"
grep -q "^polysketch-generate: .*top_p" "${tmp}/err" ||
  fail "top_p 0: message does not name top_p: $(cat "${tmp}/err")"

# 6. Garbage in other inputs: unreadable prompt file, empty prompt, bad stop token id,
# max_new_tokens 0. Each exits 1 with a message, never a crash.
run --model "${model}" --prompt_file "${tmp}/no-such-prompt"
[[ ${rc} -eq 1 ]] || fail "unreadable prompt file: exit ${rc}, want 1"
grep -q "no-such-prompt" "${tmp}/err" || fail "unreadable prompt file: $(cat "${tmp}/err")"
: > "${tmp}/empty.txt"
run --model "${model}" --prompt_file "${tmp}/empty.txt"
[[ ${rc} -eq 1 ]] || fail "empty prompt: exit ${rc}, want 1"
grep -q "empty" "${tmp}/err" || fail "empty prompt: $(cat "${tmp}/err")"
run --model "${model}" --prompt "x" --stop_token_ids 300
[[ ${rc} -eq 1 ]] || fail "stop token 300: exit ${rc}, want 1"
run --model "${model}" --prompt "x" --max_new_tokens 0
[[ ${rc} -eq 1 ]] || fail "max_new_tokens 0: exit ${rc}, want 1"
grep -q "max_new_tokens" "${tmp}/err" || fail "max_new_tokens 0: $(cat "${tmp}/err")"

# 7. Stop conditions end generation: the first greedy token of the fixture is 9 (tab).
run --model "${root}/tests/golden/polysketch-learned-local" --prompt_file "${tmp}/prompt.txt" \
  --max_new_tokens 10 --temperature 0 --stop_token_ids 9
[[ ${rc} -eq 0 && ! -s "${tmp}/out" ]] || fail "stop token: exit ${rc}, stdout $(xxd -p "${tmp}/out")"
grep -q "finish reason: stop_token" "${tmp}/err" || fail "stop token: $(cat "${tmp}/err")"
run --model "${root}/tests/golden/polysketch-learned-local" --prompt_file "${tmp}/prompt.txt" \
  --max_new_tokens 10 --temperature 0 --stop jj
[[ ${rc} -eq 0 ]] || fail "stop string: exit ${rc}"
[[ "$(cat "${tmp}/out")" == $'\t\t\t' ]] || fail "stop string: stdout $(xxd -p "${tmp}/out")"
grep -q "finish reason: stop_string" "${tmp}/err" || fail "stop string: $(cat "${tmp}/err")"

# 8. Context limits of a KV-cache model: a prompt over the limit is refused (exit 1, message
# names the limit); generation that reaches it stops there with the text so far.
softmax="${root}/tests/golden/softmax"
run --model "${softmax}" --prompt "0123456789" --max_context 8
[[ ${rc} -eq 1 ]] || fail "prompt over max_context: exit ${rc}, want 1"
grep -q "context limit 8" "${tmp}/err" || fail "prompt over max_context: $(cat "${tmp}/err")"
run --model "${softmax}" --prompt "0123" --max_context 8 --max_new_tokens 50 --temperature 0
[[ ${rc} -eq 0 ]] || fail "generation to max_context: exit ${rc}: $(cat "${tmp}/err")"
grep -q "generated tokens: 5 " "${tmp}/err" ||
  fail "generation to max_context: want 5 tokens (4 + 5 > 8 needs no 6th): $(cat "${tmp}/err")"
run --model "${model}" --prompt "x" --threads -1
[[ ${rc} -eq 1 ]] || fail "threads -1: exit ${rc}, want 1"
# --kv_cache_dtype: a bad value is refused naming the flag; fp32 and fp16 both generate (greedy,
# the same 5 tokens to the limit on this tiny prompt).
run --model "${softmax}" --prompt "0123" --kv_cache_dtype fp8
[[ ${rc} -eq 1 ]] || fail "kv_cache_dtype fp8: exit ${rc}, want 1"
grep -q -- '--kv_cache_dtype: expected auto, fp32 or fp16, got "fp8"' "${tmp}/err" ||
  fail "kv_cache_dtype fp8: $(cat "${tmp}/err")"
for dtype in fp32 fp16 auto; do
  run --model "${softmax}" --prompt "0123" --max_context 8 --max_new_tokens 50 --temperature 0 \
    --kv_cache_dtype "${dtype}"
  [[ ${rc} -eq 0 ]] || fail "kv_cache_dtype ${dtype}: exit ${rc}: $(cat "${tmp}/err")"
  grep -q "generated tokens: 5 " "${tmp}/err" || fail "kv_cache_dtype ${dtype}: $(cat "${tmp}/err")"
done

# 9. The shipped model runs and reports throughput.
run --model "${model}" --prompt "And God said" --max_new_tokens 20
[[ ${rc} -eq 0 ]] || fail "tiny-polysketch: exit ${rc}: $(cat "${tmp}/err")"
grep -q "tokens/s" "${tmp}/err" || fail "tiny-polysketch: no tokens/s in stderr"
cat "${tmp}/err"

if [[ ${failures} -ne 0 ]]; then
  echo "${failures} check(s) failed" >&2
  exit 1
fi
echo "all polysketch-generate checks passed"
