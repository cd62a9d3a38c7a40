#!/usr/bin/env bash
# What keeping the recurrent state buys (issue 9, docs/sessions.md): time to first token of
#   * a 10-turn conversation with 4000-byte turns and 64-token replies, (a) resending the whole
#     history with no state reuse, (b) resending with the prefix cache on, (c) in a session;
#   * 32 requests sharing a 16000-byte system prompt (+ 200 bytes each), with the prefix cache
#     off and on;
# each on a fresh server, one request at a time (polysketch-loadgen --scenario), plus the bytes one
# session reserves (ModelInfo.state_reuse.session_bytes).
#   bench/state_reuse.sh [MODEL_DIR]     (default models/tiny-polysketch; needs scripts/build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-${root}/models/tiny-polysketch}"
loadgen="${root}/build/clients/polysketch-loadgen"
cli="${root}/build/clients/polysketch-cli"
tmp="$(mktemp -d)"
# shellcheck source=bench/server_lib.sh
source "${root}/bench/server_lib.sh"
trap 'stop_server; rm -rf "${tmp}"' EXIT

# run LABEL SERVER_FLAGS... -- LOADGEN_FLAGS...
run() {
  local label="$1"
  shift
  local server_flags=()
  while [[ "$1" != "--" ]]; do server_flags+=("$1"); shift; done
  shift
  start_server "${model}" --slots 4 "${server_flags[@]}"
  echo "=== ${label} (server flags: ${server_flags[*]:-defaults})"
  "${loadgen}" --target "127.0.0.1:${port}" --max_new_tokens 64 "$@"
  stop_server
}

echo "model: ${model#"${root}/"}; $(nproc) cores; $(date -u +%FT%TZ)"
off=(--prefix_cache_bytes 0 --session_budget_bytes 0)
chat=(--scenario chat --turns 10 --turn_bytes 4000)
shared=(--scenario shared_prefix --requests 32 --system_bytes 16000 --user_bytes 200)
run "chat, resending the history, no state reuse" "${off[@]}" -- "${chat[@]}"
run "chat, resending the history, prefix cache on" -- "${chat[@]}"
run "chat, session" -- "${chat[@]}" --sessions
run "shared system prompt, prefix cache off" "${off[@]}" -- "${shared[@]}"
run "shared system prompt, prefix cache on" -- "${shared[@]}"
start_server "${model}" --slots 4
echo "=== bytes kept per session"
"${cli}" info --target "127.0.0.1:${port}" | grep -E "state_bytes_per_request|session_bytes" || true
stop_server
