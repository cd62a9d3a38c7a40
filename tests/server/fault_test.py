"""Fault tests against a real polysketch-server binary over loopback (issue 8).

Injects, each many times: clients that vanish at random points of a stream (cancel the call,
close the channel), cancel storms (the Cancel RPC and client-side cancel), deadline storms (tiny
deadlines), a request flood against a small queue, a slow reader, the same over the HTTP API
(malformed JSON, wrong types, unknown model, huge bodies, clients that vanish mid-body or
mid-answer, clients that send a byte at a time, clients that never read their stream), SIGTERM
during load, SIGKILL during load and a restart. After each fault it checks:
  * every RPC the test started ended, with OK or a code the fault allows (counted client-side;
    a hung RPC fails the test at the phase's bound instead of hanging it);
  * polysketch_state_slots_used, _num_requests_running and _num_requests_waiting return to 0
    (scraped from /metrics): no request stays in the engine without a final status;
  * the server's resident memory (VmRSS in /proc/PID/status) returns near its level after a
    warm-up of the same traffic (RSS_SLACK_* below say how near and why).
Prints one table row per fault (docs/reliability.md, "Fault tests").

Usage: fault_test.py <polysketch-server> <repo root> <build dir>
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Callable, Dict, List, Optional

import grpc

SERVER, ROOT, BUILD = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, os.path.join(BUILD, "python"))
from polysketch_client._proto import generation_pb2 as pb  # noqa: E402
from polysketch_client._proto import generation_pb2_grpc as pbg  # noqa: E402

MODEL = os.path.join(ROOT, "tests", "golden", "polysketch-learned-local")
# The main server has room to queue (so the storms, whose clients open at most 8 calls at once,
# meet no refusal: a vanished request leaves the server only at its next step, so the server can
# hold a few more than the client has open); the flood runs against a small queue.
SLOTS, MAX_WAITING = 4, 64
FLOOD_SLOTS, FLOOD_MAX_WAITING = 2, 4
# A fault may leave the allocator holding some freed memory (glibc keeps per-thread arenas and
# trims lazily; gRPC keeps buffers per connection it has seen), so RSS after a fault is compared
# with RSS after a warm-up of the same traffic, allowing 8 MiB + 10%. A leak of one slot, one
# stream's pending messages or one request's prompt per request injected is far larger over the
# hundreds of requests of each fault: 300 requests x 32 KiB would be 9.4 MiB on its own.
RSS_SLACK_BYTES = 8 << 20
RSS_SLACK_FRACTION = 0.10
# Under AddressSanitizer (scripts/sanitize sets ASAN_OPTIONS) freed memory sits in ASan's
# quarantine (256 MiB by default) and shadow memory grows with it, so RSS says nothing about
# leaks there; LeakSanitizer checks the server at exit instead. The statuses and slots are still
# checked.
RSS_CHECKED = "ASAN_OPTIONS" not in os.environ
PHASE_BOUND_S = 60  # every RPC of a phase must end within this; a hang fails the test here
CODE = grpc.StatusCode
RNG = random.Random(8)


LOG_DIR = tempfile.mkdtemp(prefix="fault_test-")  # server logs; kept when the test fails


def fail(message: str) -> None:
    print(f"FAIL: {message} (server logs in {LOG_DIR})", file=sys.stderr, flush=True)
    raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A polysketch-server process on loopback; stderr goes to a log file."""

    def __init__(self, log_dir: str, port: int = 0, slots: int = SLOTS,
                 max_waiting: int = MAX_WAITING) -> None:
        self.log_path = os.path.join(log_dir, f"server-{time.monotonic_ns()}.log")
        self.log = open(self.log_path, "w")
        args = [SERVER, "--model", MODEL, "--host", "127.0.0.1", "--port", str(port),
                "--metrics_host", "127.0.0.1", "--metrics_port", "0", "--http_port", "0",
                "--threads", "2",
                "--slots", str(slots), "--max_waiting", str(max_waiting),
                "--max_new_tokens_limit", "100000", "--drain_timeout", "2s"]
        self.proc = subprocess.Popen(args, stderr=self.log, stdout=subprocess.DEVNULL)
        ready = re.compile(r"^polysketch-server: serving .* on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")
        http = re.compile(r"^polysketch-server: HTTP on [^ ]+:(\d+) ")
        for _ in range(600):
            if self.proc.poll() is not None:
                fail(f"server exited at start ({self.proc.returncode}): {self.tail()}")
            with open(self.log_path) as f:
                for line in f:
                    if http.match(line):
                        self.http_port = int(http.match(line).group(1))
                    m = ready.match(line)
                    if m:
                        self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
                        self.stub = pbg.GenerationServiceStub(self.channel)
                        return
            time.sleep(0.05)
        fail("server printed no ready line in 30 s")

    def tail(self) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-20:])

    def metrics(self) -> Dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        fail("no VmRSS in /proc/PID/status")
        return 0

    def wait_engine_empty(self, what: str) -> Dict[str, float]:
        """Polls /metrics until no slot is used and nothing runs or waits (30 s at most)."""
        names = ("polysketch_state_slots_used", "polysketch_num_requests_running",
                 "polysketch_num_requests_waiting")
        for _ in range(300):
            m = self.metrics()
            if all(m.get(n) == 0 for n in names):
                return m
            time.sleep(0.1)
        fail(f"{what}: engine not empty 30 s after the fault: "
             + ", ".join(f"{n}={m.get(n)}" for n in names))
        return {}

    def wait_metrics(self, what: str, condition: Callable[[Dict[str, float]], bool],
                     timeout: float = 30) -> Dict[str, float]:
        """Polls /metrics until `condition` holds (the metrics, not a sleep, say the server got
        there); fails naming `what` if it does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if condition(m):
                return m
            if time.monotonic() > deadline:
                fail(f"{what}: not within {timeout} s")
            time.sleep(0.02)

    def decode_steps(self) -> float:
        """Decode steps the engine has run (each advances every running stream by one token)."""
        return self.metrics().get("polysketch_decode_batch_size_count", 0.0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        self.log.close()
        return self.proc.returncode


def request(max_new_tokens: int, request_id: str = "", prompt: bytes = b"") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        text=prompt or b"In the beginning God created the heaven and the earth. "
        * RNG.randint(1, 8),
        max_new_tokens=max_new_tokens, request_id=request_id.encode(),
        sampling=pb.SamplingParams(temperature=1.0, seed=RNG.randint(1, 1 << 30)))


class Tally:
    """Final status of every RPC of a phase, by code name (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: collections.Counter = collections.Counter()
        self.started = 0

    def start(self) -> None:
        with self.lock:
            self.started += 1

    def end(self, code: CODE) -> None:
        with self.lock:
            self.codes[code.name] += 1

    def ended(self) -> int:
        with self.lock:
            return sum(self.codes.values())


def run_all(jobs: List[Callable[[], None]], workers: int, what: str) -> None:
    """Runs the jobs on a thread pool; fails if any is still running after PHASE_BOUND_S."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(job) for job in jobs]
    done, pending = concurrent.futures.wait(futures, timeout=PHASE_BOUND_S)
    if pending:
        fail(f"{what}: {len(pending)} of {len(futures)} RPCs did not end within "
             f"{PHASE_BOUND_S} s (a request without a final status)")
    for f in done:
        f.result()  # re-raises an unexpected exception of the job
    pool.shutdown()


def read_stream(call, tally: Tally, allowed: set, stop_after: Optional[int] = None,
                on_stop: Optional[Callable[[], None]] = None) -> Optional[pb.FinalInfo]:
    """Reads `call` to its end and records its status; calls on_stop after `stop_after` messages
    (then keeps reading: a cancelled stream still ends with a status). Returns the final info."""
    final = None
    count = 0
    try:
        for message in call:
            count += 1
            if message.HasField("final"):
                final = message.final
            if stop_after is not None and count == stop_after and on_stop is not None:
                on_stop()
        code = CODE.OK
    except grpc.RpcError as e:
        code = e.code()
    tally.end(code)
    if code.name not in allowed:
        fail(f"unexpected status {code.name}: {call.details() if code != CODE.OK else ''}")
    return final


Row = collections.namedtuple("Row", "fault injected survived checks")
ROWS: List[Row] = []


def check_after(server: Server, what: str, tally: Tally, baseline_rss: int, injected: int,
                checks: str) -> None:
    if tally.ended() != tally.started:
        fail(f"{what}: {tally.started} RPCs started, {tally.ended()} ended")
    server.wait_engine_empty(what)
    rss = server.rss()
    limit = baseline_rss * (1 + RSS_SLACK_FRACTION) + RSS_SLACK_BYTES
    print(f"{what}: {tally.started} RPCs, statuses {dict(tally.codes)}, RSS {rss / 2**20:.1f} MiB "
          f"(warm {baseline_rss / 2**20:.1f} MiB, limit {limit / 2**20:.1f} MiB)", flush=True)
    if RSS_CHECKED and rss > limit:
        fail(f"{what}: RSS {rss} bytes after the fault, more than {limit:.0f} "
             f"(warm-up level {baseline_rss} + {RSS_SLACK_FRACTION:.0%} + {RSS_SLACK_BYTES})")
    ROWS.append(Row(what, injected, injected, checks))


# --- The faults ----------------------------------------------------------------------------------


def http_exchange(port: int, raw: bytes, read: bool = True, timeout: float = PHASE_BOUND_S) -> int:
    """Sends `raw` on a new connection; returns the answer's HTTP status (0 when not read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        if not read:
            return 0
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                fail(f"HTTP: connection closed without an answer to {raw[:80]!r}")
            data += chunk
        return int(data.split(b" ", 2)[1])


def http_request(body: bytes, path: str = "/v1/completions", extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode() \
        + extra + b"\r\n" + body


# Bodies a broken or hostile client sends, and the status each must get.
HTTP_BAD_BODIES = [
    (b'{"prompt": "x", ', 400), (b"\xff\xfe{}", 400), (b"[1, 2, 3]", 400), (b"", 400),
    (b'{"prompt": 5}', 400), (b'{"prompt": "x", "temperature": "hot"}', 400),
    (b'{"prompt": "x", "max_tokens": -1}', 400), (b'{"prompt": "x", "top_p": 0}', 400),
    (b'{"prompt": [1, 99999]}', 400), (b'{"prompt": "x", "stop": [""]}', 400),
    (b'{"prompt": "x", "n": 3}', 400), (b"[" * 100000, 400),
    (b'{"prompt": "x", "model": "gpt-4"}', 404),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', 400),
]


def http_faults(server: Server, n: int, tally: Tally) -> None:
    """n HTTP clients that misbehave: a malformed or refused body (each must get its status), a
    body over --max_receive_message_bytes (413), a client that vanishes after part of its body,
    while its request waits or generates, or after part of its stream, and a few that send their
    request a byte at a time (others are served meanwhile)."""
    port = server.http_port
    long_body = b'{"prompt": "In the beginning", "max_tokens": 100000, "stream": %s}'

    def one(i: int) -> Callable[[], None]:
        kind = i % 6

        def job() -> None:
            tally.start()
            if kind == 0:
                body, want = HTTP_BAD_BODIES[RNG.randrange(len(HTTP_BAD_BODIES))]
                path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
                got = http_exchange(port, http_request(body, path))
                if got != want:
                    fail(f"HTTP {body[:60]!r}: status {got}, want {want}")
                tally.end(CODE.INVALID_ARGUMENT if got == 400 else CODE.NOT_FOUND)
            elif kind == 1:
                head = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"
                        b"Content-Length: 9437184\r\n\r\n")
                got = http_exchange(port, head + b"a" * RNG.randrange(0, 65536))
                if got != 413:
                    fail(f"HTTP huge body: status {got}, want 413")
                tally.end(CODE.RESOURCE_EXHAUSTED)
            elif kind == 2:  # vanishes after part of its body
                raw = http_request(long_body % b"false")
                http_exchange(port, raw[:RNG.randrange(1, len(raw))], read=False)
                tally.end(CODE.CANCELLED)
            else:  # vanishes while its request runs, or after part of its stream
                stream = kind >= 4
                with socket.create_connection(("127.0.0.1", port), timeout=PHASE_BOUND_S) as sock:
                    sock.sendall(http_request(long_body % (b"true" if stream else b"false")))
                    if stream:
                        received = 0
                        want = RNG.randrange(0, 4096)
                        while received < want:
                            chunk = sock.recv(4096)
                            if not chunk:
                                fail("HTTP stream ended early")
                            received += len(chunk)
                    else:
                        time.sleep(RNG.uniform(0, 0.2))
                tally.end(CODE.CANCELLED)
        return job

    def slow() -> None:
        tally.start()
        raw = http_request(b'{"prompt": "And God said", "max_tokens": 4}')
        with socket.create_connection(("127.0.0.1", port), timeout=PHASE_BOUND_S) as sock:
            for b in raw:
                sock.send(bytes([b]))
                time.sleep(0.005)
            status = int(sock.recv(4096).split(b" ", 2)[1])
        if status != 200:
            fail(f"HTTP byte-at-a-time client: status {status}")
        tally.end(CODE.OK)

    jobs = [one(i) for i in range(n)] + [slow for _ in range(4)]
    RNG.shuffle(jobs)
    run_all(jobs, 8, "HTTP faults")
    # The server still answers.
    if http_exchange(port, http_request(b'{"prompt": "x", "max_tokens": 2}')) != 200:
        fail("HTTP: no answer after the faults")


def http_slow_reader(server: Server, tally: Tally) -> None:
    """HTTP streams whose clients never read (small receive buffers): the server cancels them
    past --max_stream_buffer_bytes while serving others."""
    socks = []
    for _ in range(2):
        tally.start()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.http_port))
        sock.sendall(http_request(b'{"prompt": "x", "max_tokens": 100000, "stream": true, '
                                  b'"logprobs": 20}'))
        socks.append(sock)
    if http_exchange(server.http_port, http_request(b'{"prompt": "x", "max_tokens": 8}')) != 200:
        fail("HTTP slow reader: another client was not served")
    # The clients are still connected and still not reading: only the bound frees the slots.
    server.wait_engine_empty("HTTP slow reader")
    for sock in socks:
        sock.close()
        tally.end(CODE.RESOURCE_EXHAUSTED)


def vanishing_clients(server: Server, n: int, tally: Tally) -> None:
    """n clients that vanish at a random point: a stream cancelled or its channel closed after a
    random number of messages (0: before reading any), a unary call cancelled after a random
    delay, and a long prompt (16 to 64 KiB) given up while it is being prefilled."""
    target = f"127.0.0.1:{server.port}"

    def one(i: int) -> Callable[[], None]:
        stop_after = RNG.choice([0, 1, 1, 2, 3, 5, 8, 20])
        how = RNG.choice(["cancel", "close", "cancel", "close", "unary", "prefill"])
        max_new = RNG.choice([8, 64, 4096])
        delay = RNG.choice([0.0, 0.001, 0.01, 0.05, 0.2])

        def job() -> None:
            tally.start()
            if how == "unary":
                future = server.stub.Generate.future(request(max_new), timeout=PHASE_BOUND_S)
                time.sleep(delay)
                future.cancel()
                try:
                    future.result()
                    tally.end(CODE.OK)
                except grpc.FutureCancelledError:
                    tally.end(CODE.CANCELLED)
                except grpc.RpcError as e:
                    tally.end(e.code())
                    if e.code() != CODE.CANCELLED:
                        fail(f"vanishing unary client: {e.code().name}: {e.details()}")
                return
            if how == "prefill":
                prompt = b"and it was so. " * (RNG.randint(16 << 10, 64 << 10) // 15)
                call = server.stub.GenerateStream(request(64, prompt=prompt),
                                                  timeout=PHASE_BOUND_S)
                time.sleep(delay)
                call.cancel()
                read_stream(call, tally, {"OK", "CANCELLED"})
                return
            channel = grpc.insecure_channel(target) if how == "close" else server.channel
            stub = pbg.GenerationServiceStub(channel)
            call = stub.GenerateStream(request(max_new), timeout=PHASE_BOUND_S)
            vanish = call.cancel if how == "cancel" else channel.close
            if stop_after == 0:
                vanish()
            read_stream(call, tally, {"OK", "CANCELLED"}, stop_after, vanish)
            if how == "close":
                channel.close()
        return job

    run_all([one(i) for i in range(n)], workers=8, what="vanishing clients")


def cancel_storm(server: Server, n: int, tally: Tally) -> None:
    """n streams with ids; each is cancelled by the Cancel RPC (from another thread, at a random
    moment) or by the client. A Cancel that races the request's end or its submission answers
    NOT_FOUND and the stream ends OK; a stream cancelled by the RPC gets its final message."""
    finals = collections.Counter()
    cancel_answers = collections.Counter()  # the Cancel RPC's codes (checked on this thread)
    cancellers: List[threading.Thread] = []
    lock = threading.Lock()

    def one(i: int) -> Callable[[], None]:
        rid = f"storm-{i}-{RNG.getrandbits(32)}"
        by_rpc = i % 2 == 0
        delay = RNG.choice([0.0, 0.001, 0.005, 0.02, 0.05])
        stop_after = RNG.choice([1, 2, 4])

        def job() -> None:
            tally.start()
            call = server.stub.GenerateStream(request(4096, rid), timeout=PHASE_BOUND_S)
            if by_rpc:
                def cancel_rpc() -> None:
                    time.sleep(delay)
                    try:
                        server.stub.Cancel(pb.CancelRequest(request_id=rid.encode()), timeout=10)
                        code = CODE.OK
                    except grpc.RpcError as e:
                        code = e.code()
                    with lock:
                        cancel_answers[code.name] += 1
                canceller = threading.Thread(target=cancel_rpc)
                with lock:
                    cancellers.append(canceller)
                canceller.start()
                final = read_stream(call, tally, {"OK", "CANCELLED"})
                if final is not None:
                    with lock:
                        finals[pb.FinishReason.Name(final.finish_reason)] += 1
            else:
                read_stream(call, tally, {"OK", "CANCELLED"}, stop_after, call.cancel)
        return job

    run_all([one(i) for i in range(n)], workers=8, what="cancel storm")
    for canceller in cancellers:
        canceller.join(timeout=PHASE_BOUND_S)
    if set(cancel_answers) - {"OK", "NOT_FOUND"} or sum(cancel_answers.values()) != (n + 1) // 2:
        fail(f"cancel storm: the Cancel RPC must answer OK or NOT_FOUND: {dict(cancel_answers)}")
    print(f"cancel storm: Cancel RPC answers {dict(cancel_answers)}, finals of streams cancelled "
          f"by it {dict(finals)}", flush=True)
    if finals["FINISH_REASON_CANCELLED"] == 0:
        fail(f"cancel storm: no stream cancelled by the Cancel RPC got a CANCELLED final: {finals}")


def deadline_storm(server: Server, n: int, tally: Tally) -> None:
    """n requests (unary and streaming) with deadlines of 1 ms to 1 s. The client forgets a
    request at its deadline; the server ends it at its next step, so the server can briefly hold
    more requests than the client has open and the small queue may refuse some: RESOURCE_EXHAUSTED
    is allowed here too."""
    allowed = {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}

    def one(i: int) -> Callable[[], None]:
        timeout = RNG.choice([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0])
        unary = i % 3 == 0

        def job() -> None:
            tally.start()
            if unary:
                try:
                    server.stub.Generate(request(2000), timeout=timeout)
                    tally.end(CODE.OK)
                except grpc.RpcError as e:
                    tally.end(e.code())
                    if e.code().name not in allowed:
                        fail(f"deadline storm: unary ended {e.code().name}: {e.details()}")
            else:
                read_stream(server.stub.GenerateStream(request(2000), timeout=timeout), tally,
                            allowed)
        return job

    run_all([one(i) for i in range(n)], workers=8, what="deadline storm")


def queue_flood(server: Server, n: int, tally: Tally) -> None:
    """n concurrent requests against FLOOD_SLOTS slots and FLOOD_MAX_WAITING queue places: those
    that find no room are refused with RESOURCE_EXHAUSTED at once, the others finish OK; nothing
    else."""
    gate = threading.Barrier(n)

    def job() -> None:
        tally.start()
        gate.wait()
        read_stream(server.stub.GenerateStream(request(200), timeout=PHASE_BOUND_S), tally,
                    {"OK", "RESOURCE_EXHAUSTED"})

    run_all([job] * n, workers=n, what="queue flood")
    if tally.codes["RESOURCE_EXHAUSTED"] == 0 or tally.codes["OK"] < FLOOD_SLOTS:
        fail(f"queue flood: want both refusals and successes, got {dict(tally.codes)}")


def slow_reader(server: Server, tally: Tally) -> None:
    """A client that stops reading a long stream: the server must keep serving others (the engine
    never waits for a client), and the stream, read late, is complete."""
    max_new = 20000
    tally.start()
    slow = server.stub.GenerateStream(request(max_new), timeout=PHASE_BOUND_S)
    first = next(slow)  # started; now stop reading
    others = Tally()
    for _ in range(3):  # others are served while it stalls
        others.start()
        try:
            server.stub.Generate(request(16), timeout=30)
            others.end(CODE.OK)
        except grpc.RpcError as e:
            fail(f"slow reader: another request failed while it stalled: {e.code().name}")
    # The engine produces output the client does not read: 200 more decode steps.
    steps = server.decode_steps()
    server.wait_metrics("slow reader: 200 decode steps while it stalls",
                        lambda m: m.get("polysketch_decode_batch_size_count", 0) >= steps + 200)
    tokens = len(first.tokens)
    final = None
    try:
        for message in slow:
            tokens += len(message.tokens)
            if message.HasField("final"):
                final = message.final
        tally.end(CODE.OK)
    except grpc.RpcError as e:
        fail(f"slow reader: the stream ended {e.code().name}: {e.details()}")
    if final is None or final.generated_tokens != max_new or tokens != max_new:
        fail(f"slow reader: got {tokens} tokens, final {final}, want {max_new}")
    # A slow reader that then vanishes.
    tally.start()
    gone = server.stub.GenerateStream(request(max_new), timeout=PHASE_BOUND_S)
    next(gone)
    steps = server.decode_steps()
    server.wait_metrics("vanishing slow reader: 50 decode steps unread",
                        lambda m: m.get("polysketch_decode_batch_size_count", 0) >= steps + 50)
    gone.cancel()
    read_stream(gone, tally, {"CANCELLED"})


def sigterm_during_load(server: Server, tally: Tally) -> int:
    """SIGTERM with streams and unary calls running and queued: each gets a final status (OK when
    it finished within the drain, CANCELLED after it, UNAVAILABLE if it reached the server only
    after the signal), a stream cancelled by the drain gets its final message first, and the
    server exits 0."""
    started = threading.Barrier(17)
    allowed = {"OK", "CANCELLED", "UNAVAILABLE"}
    cancelled_finals = collections.Counter()
    lock = threading.Lock()

    def stream_job() -> None:
        tally.start()
        call = server.stub.GenerateStream(request(RNG.choice([50, 100000])), timeout=PHASE_BOUND_S)
        started.wait()
        final = read_stream(call, tally, allowed)
        if call.code() == CODE.CANCELLED:
            reason = pb.FinishReason.Name(final.finish_reason) if final is not None else "none"
            with lock:
                cancelled_finals[reason] += 1

    def unary_job() -> None:
        tally.start()
        future = server.stub.Generate.future(request(100000), timeout=PHASE_BOUND_S)
        started.wait()
        try:
            future.result()
            tally.end(CODE.OK)
        except grpc.RpcError as e:
            tally.end(e.code())
            if e.code().name not in allowed:
                fail(f"SIGTERM: unary ended {e.code().name}")

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    futures = [pool.submit(stream_job if i % 2 else unary_job) for i in range(16)]
    started.wait()
    # SIGTERM under load: once the engine runs some of them (the rest may still be queued).
    server.wait_metrics("SIGTERM: requests running",
                        lambda m: m.get("polysketch_num_requests_running", 0) >= 1)
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        fail(f"SIGTERM: server still running 30 s later (drain timeout 2 s): {server.tail()}")
    done, pending = concurrent.futures.wait(futures, timeout=PHASE_BOUND_S)
    if pending:
        fail(f"SIGTERM: {len(pending)} RPCs did not end")
    for f in done:
        f.result()
    pool.shutdown()
    if rc != 0:
        fail(f"SIGTERM: exit status {rc}, want 0: {server.tail()}")
    # Before the fix the drain cut every call: UNAVAILABLE, no final message.
    if set(cancelled_finals) - {"FINISH_REASON_CANCELLED"} or tally.codes["CANCELLED"] < 4:
        fail(f"SIGTERM: streams cancelled by the drain must get a CANCELLED final message and "
             f"most calls CANCELLED; finals {dict(cancelled_finals)}, statuses {dict(tally.codes)}")
    return rc


def main() -> None:
    begin = time.monotonic()
    tmp = LOG_DIR
    server = Server(tmp)
    try:
        # Warm-up: the same kinds of traffic, so allocator arenas, gRPC's threads and buffers
        # reach their working size before the baseline is taken.
        warm = Tally()
        vanishing_clients(server, 40, warm)
        server.wait_engine_empty("warm-up")
        deadline_storm(server, 40, Tally())
        server.wait_engine_empty("warm-up")
        baseline = server.rss()
        print(f"warm-up done: RSS {baseline / 2**20:.1f} MiB", flush=True)

        tally = Tally()
        vanishing_clients(server, 300, tally)
        check_after(server, "client vanishes (stream cancel or channel close at a random "
                    "message, unary cancel, long prompt given up in prefill)", tally, baseline,
                    300, "slots 0, all RPCs ended OK/CANCELLED, RSS")

        tally = Tally()
        cancel_storm(server, 200, tally)
        check_after(server, "cancel storm (Cancel RPC + client cancel)", tally, baseline, 200,
                    "slots 0, CANCELLED final message, RSS")

        before = server.metrics()
        tally = Tally()
        deadline_storm(server, 300, tally)
        check_metrics_deadline(server, before)
        check_after(server, "deadline storm (1 ms - 1 s deadlines)", tally, baseline, 300,
                    "slots 0, OK/DEADLINE_EXCEEDED (RESOURCE_EXHAUSTED), counted as deadline, RSS")

        tally = Tally()
        slow_reader(server, tally)
        check_after(server, "slow reader (stops reading a 20000-token stream)", tally, baseline, 2,
                    "others served meanwhile, stream complete when read, slots 0, RSS")

        tally = Tally()
        http_faults(server, 300, tally)
        check_after(server, "HTTP: malformed / refused bodies, huge bodies, clients vanishing "
                    "mid-body, mid-request and mid-stream, byte-at-a-time clients", tally,
                    baseline, 304, "each its status (400/404/413), others served, slots 0, RSS")

        tally = Tally()
        overflows = server.metrics().get("polysketch_stream_buffer_overflow_total", 0)
        http_slow_reader(server, tally)
        check_after(server, "HTTP slow reader (2 streams never read)", tally, baseline, 2,
                    "others served, cancelled at --max_stream_buffer_bytes, slots 0, RSS")
        if server.metrics().get("polysketch_stream_buffer_overflow_total", 0) < overflows + 2:
            fail("HTTP slow reader: the streams were not cancelled for not reading")

        tally = Tally()
        sigterm_during_load(server, tally)
        ROWS.append(Row("SIGTERM during load (16 RPCs)", 1, 1,
                        "every RPC ended OK/CANCELLED (UNAVAILABLE if late), drain-cancelled "
                        "streams get a CANCELLED final message, exit 0"))
        print(f"SIGTERM: statuses {dict(tally.codes)}, exit 0", flush=True)
        server.stop()

        # A flood against a small queue, on its own server.
        server = Server(tmp, slots=FLOOD_SLOTS, max_waiting=FLOOD_MAX_WAITING)
        queue_flood(server, 48, Tally())  # warm-up
        server.wait_engine_empty("queue flood warm-up")
        baseline = server.rss()
        tally = Tally()
        for _ in range(5):
            queue_flood(server, 48, tally)
            server.wait_engine_empty("queue flood")
        check_after(server, "request flood on a full queue (5 x 48 concurrent)", tally, baseline,
                    5 * 48, "only OK/RESOURCE_EXHAUSTED, slots 0, RSS")
        server.stop()

        # SIGKILL with load, then a restart on the same port.
        for round_ in range(3):
            server = Server(tmp)
            port = server.port
            tally = Tally()
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

            def job() -> None:
                tally.start()
                read_stream(server.stub.GenerateStream(request(100000), timeout=PHASE_BOUND_S),
                            tally, {"UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN"})
            futures = [pool.submit(job) for _ in range(8)]
            # SIGKILL under load: once the engine runs some of them.
            server.wait_metrics("SIGKILL: requests running",
                                lambda m: m.get("polysketch_num_requests_running", 0) >= 1)
            server.proc.kill()
            server.proc.wait()
            done, pending = concurrent.futures.wait(futures, timeout=PHASE_BOUND_S)
            if pending:
                fail(f"SIGKILL: {len(pending)} RPCs did not end after the server died")
            for f in done:
                f.result()
            pool.shutdown()
            server.stop()
            server = Server(tmp, port=port)
            if server.port != port:
                fail(f"restart: listening on {server.port}, want {port}")
            r = server.stub.Generate(request(8), timeout=30)
            if r.final.generated_tokens != 8:
                fail(f"restart: {r}")
            server.wait_engine_empty("restart")
            print(f"SIGKILL round {round_}: clients ended {dict(tally.codes)}; restarted server "
                  f"served", flush=True)
            server.stop()
        ROWS.append(Row("SIGKILL during load (8 streams) and restart on the same port", 3, 3,
                        "clients end UNAVAILABLE, new server serves, slots 0"))
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    print("\n| fault | times injected | survived | checks |\n| --- | --- | --- | --- |")
    for row in ROWS:
        print(f"| {row.fault} | {row.injected} | {row.survived} | {row.checks} |")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nPASS in {time.monotonic() - begin:.1f} s")


def check_metrics_deadline(server: Server, before: Dict[str, float]) -> None:
    """A request whose deadline passed is counted as a deadline failure, never as cancelled."""
    after = server.wait_engine_empty("deadline storm")
    key = 'polysketch_request_failure_total{reason="%s"}'
    cancelled = after[key % "cancelled"] - before[key % "cancelled"]
    deadline = after[key % "deadline"] - before[key % "deadline"]
    # Before the fix a quarter of them counted as cancelled (the client's RST_STREAM beats the
    # server's own deadline). The server takes a cancel within 1 s of the deadline as the
    # deadline; 5% leaves room for a loaded machine delaying a request's headers past that.
    if deadline == 0 or cancelled > deadline * 0.05:
        fail(f"deadline storm: server counted {cancelled:.0f} cancelled and {deadline:.0f} "
             "deadline failures; a passed deadline must count as deadline")


if __name__ == "__main__":
    main()
