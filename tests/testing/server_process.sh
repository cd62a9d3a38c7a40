# Shared by the shell tests that drive a real polysketch-server over loopback (source it after
# setting `server` to the binary). Defines:
#   tmp                          a scratch folder, removed at exit (with any server still running)
#   fail MESSAGE                 prints FAIL and the tail of the server log, exits 1
#   start_server MODEL [flags]   starts the server on free ports and waits for its ready line;
#                                sets pid, line, port, metrics_port, health_port (empty without
#                                --health_port), http_port (the HTTP API's; empty with
#                                --http_port=-1)
#   stop_server                  SIGTERM, up to 10 s to drain, then SIGKILL
# A script that starts more processes defines `cleanup_more` (called at exit with the exit status,
# before the server is killed and tmp removed) to stop them.
tmp="$(mktemp -d)"
pid=""
cleanup() {
  local rc=$?
  if declare -F cleanup_more > /dev/null; then cleanup_more "${rc}" || true; fi
  if [[ -n "${pid}" ]]; then kill -9 "${pid}" 2> /dev/null || true; fi
  rm -rf "${tmp}"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  if [[ -f "${tmp}/server.log" ]]; then
    echo "--- server log (tail) ---" >&2
    tail -20 "${tmp}/server.log" >&2
  fi
  exit 1
}

start_server() {
  local model="$1"
  shift
  : > "${tmp}/server.log"
  "${server}" --model "${model}" --host 127.0.0.1 --port 0 --metrics_host 127.0.0.1 \
    --metrics_port 0 --http_port 0 "$@" 2> "${tmp}/server.log" &
  pid=$!
  for _ in $(seq 1 300); do
    grep -q "^polysketch-server: serving" "${tmp}/server.log" && break
    kill -0 "${pid}" 2> /dev/null || fail "server exited at start"
    sleep 0.1
  done
  line="$(grep "^polysketch-server: serving" "${tmp}/server.log")" || fail "no ready line"
  port="$(sed -E 's/.* on [^ ]+:([0-9]+), metrics on .*/\1/' <<< "${line}")"
  [[ "${port}" =~ ^[0-9]+$ ]] || fail "cannot read the port from: ${line}"
  metrics_port="$(sed -E 's/.*, metrics on [^ ]+:([0-9]+).*/\1/' <<< "${line}")"
  health_port="$(sed -nE 's/.*, health on [^ ]+:([0-9]+).*/\1/p' <<< "${line}")"
  http_port="$(sed -nE 's/^polysketch-server: HTTP on [^ ]+:([0-9]+) .*/\1/p' "${tmp}/server.log")"
  echo "server ready: ${line}"
}

stop_server() {
  kill -TERM "${pid}"
  for _ in $(seq 1 100); do
    kill -0 "${pid}" 2> /dev/null || break
    sleep 0.1
  done
  kill -9 "${pid}" 2> /dev/null || true
  wait "${pid}" 2> /dev/null || true
  pid=""
}
