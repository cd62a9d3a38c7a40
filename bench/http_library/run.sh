#!/usr/bin/env bash
# The measurement behind the HTTP library of server/http/ (docs/performance.md, "HTTP library"):
# the same three handlers on cpp-httplib 0.11.4 (Debian 12's libcpp-httplib-dev, prebuilt, with a
# pool of 8 and of 64 threads) and on Boost.Beast 1.74 (one I/O thread, async), driven by
# client.mjs (node): a trivial JSON POST at concurrency 1 and 32 over keep-alive, 8 and 64
# concurrent SSE streams of 20 events 50 ms apart, and a request held 3 s whose client leaves
# after 100 ms (does the server find out?). Needs libcpp-httplib-dev, which the project does not
# otherwise use (apt-get install libcpp-httplib-dev). Prints each server's lines and its threads.
set -euo pipefail
cd "$(dirname "$0")"
out="$(mktemp -d)"
trap 'rm -rf "${out}"' EXIT
g++ -std=c++20 -O2 -o "${out}/httplib_server" httplib_server.cc -DCPPHTTPLIB_OPENSSL_SUPPORT \
  -lcpp-httplib -lssl -lcrypto -pthread
g++ -std=c++20 -O2 -o "${out}/beast_server" beast_server.cc -pthread
port=18700
for config in "httplib 8" "httplib 64" "beast 1"; do
  read -r name threads <<< "${config}"
  port=$((port + 1))
  "${out}/${name}_server" "${port}" "${threads}" 2> "${out}/${name}.err" &
  pid=$!
  for _ in $(seq 50); do (exec 3<> "/dev/tcp/127.0.0.1/${port}") 2> /dev/null && break; sleep 0.1; done
  echo "== ${name}, ${threads} thread(s)"
  node client.mjs "${port}"
  echo "threads: $(ls "/proc/${pid}/task" | wc -l)"
  kill "${pid}"
  wait "${pid}" 2> /dev/null || true
  cat "${out}/${name}.err"
done
