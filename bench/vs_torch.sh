#!/usr/bin/env bash
# The engine against the PyTorch reference (train/model.py) on the same model, prompt, token
# count and thread count, one after the other in one run: batch-1 prefill and recurrent decode,
# greedy (issue 4's "at least 10x" target is on the decode figure).
#   bench/vs_torch.sh [MODEL_DIR] [THREADS] [NEW_TOKENS]
# Needs a build (scripts/build) and /usr/bin/python3 with torch (scripts/setup-deps).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-${root}/models/tiny-polysketch}"
threads="${2:-2}"
tokens="${3:-200}"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
# A 1000-byte prompt: held-out text (Mark is not trained on, train/corpus.py).
bible -f "Mark1:1-Mark3:35" > "${tmp}/text.txt"
head -c 1000 "${tmp}/text.txt" > "${tmp}/prompt.txt"
if [[ $(wc -c < "${tmp}/prompt.txt") -lt 1000 ]]; then
  echo "the bible program (Debian bible-kjv, scripts/setup-deps) gave no text" >&2
  exit 1
fi

echo "model ${model#"${root}/"}, ${threads} threads, 1000-byte prompt, ${tokens} greedy tokens"
/usr/bin/python3 "${root}/train/generate.py" --model "${model}" --prompt-file "${tmp}/prompt.txt" \
  --max-tokens "${tokens}" --temperature 0 --threads "${threads}" > /dev/null 2> "${tmp}/torch.err"
"${root}/build/polysketch-generate" --model "${model}" --prompt_file "${tmp}/prompt.txt" \
  --max_new_tokens "${tokens}" --temperature 0 --threads "${threads}" > /dev/null 2> "${tmp}/engine.err"

torch_prompt=$(sed -nE 's/.*tokens in [0-9.]+s, ([0-9.]+) tok\/s; generated.*/\1/p' "${tmp}/torch.err")
torch_decode=$(sed -nE 's/.*generated [0-9]+ tokens in [0-9.]+s, ([0-9.]+) tok\/s.*/\1/p' "${tmp}/torch.err")
engine_prompt=$(sed -nE 's/^prompt tokens: [0-9]+ \(([0-9.]+) tokens\/s\)/\1/p' "${tmp}/engine.err")
engine_decode=$(sed -nE 's/^generated tokens: [0-9]+ \(([0-9.]+) tokens\/s\)/\1/p' "${tmp}/engine.err")
if [[ -z "${torch_decode}" || -z "${engine_decode}" ]]; then
  echo "could not parse the outputs:" >&2
  cat "${tmp}/torch.err" "${tmp}/engine.err" >&2
  exit 1
fi
printf '%-22s %14s %14s\n' "" "prefill tok/s" "decode tok/s"
printf '%-22s %14s %14s\n' "pytorch reference" "${torch_prompt}" "${torch_decode}"
printf '%-22s %14s %14s\n' "polysketch engine" "${engine_prompt}" "${engine_decode}"
awk -v a="${engine_prompt}" -v b="${torch_prompt}" -v c="${engine_decode}" -v d="${torch_decode}" \
  'BEGIN { printf "%-22s %13.1fx %13.1fx\n", "speed-up", a / b, c / d }'
