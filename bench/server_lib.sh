# Shared by the serving benchmarks (source it): starts and stops one polysketch-server on
# loopback. Expects `root` (the repository) and `tmp` (a scratch folder) to be set.
#   start_server MODEL_DIR [server flags...]   sets pid, port and http_port (the HTTP API's) once
#                                              the ready line appears
#   stop_server                                SIGTERM (drain), then wait
pid=""
port=""
http_port=""

start_server() {
  local model="$1"
  shift
  "${root}/build/polysketch-server" --model "${model}" --host 127.0.0.1 --port 0 \
    --metrics_host 127.0.0.1 --metrics_port 0 --http_port 0 "$@" 2> "${tmp}/server.log" &
  pid=$!
  for _ in $(seq 1 600); do
    grep -q "^polysketch-server: serving" "${tmp}/server.log" && break
    kill -0 "${pid}" 2> /dev/null || { cat "${tmp}/server.log" >&2; exit 1; }
    sleep 0.1
  done
  port="$(sed -nE 's/^polysketch-server: serving .* on [^ ]+:([0-9]+), metrics on .*/\1/p' \
    "${tmp}/server.log")"
  http_port="$(sed -nE 's/^polysketch-server: HTTP on [^ ]+:([0-9]+) .*/\1/p' "${tmp}/server.log")"
}

stop_server() {
  if [[ -n "${pid}" ]]; then
    kill -TERM "${pid}" 2> /dev/null || true
    wait "${pid}" 2> /dev/null || true
    pid=""
  fi
}
