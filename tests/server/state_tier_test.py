"""The shared state tier against real processes: a redis-server this test starts (no mock) and
polysketch-server binaries with --state_tier (docs/sessions.md, "Shared tier").

Checks, in order:
  1. two servers sharing one Redis continue each other's sessions: turns alternating between
     them give exactly the tokens one server alone gives (greedy);
  2. SIGKILL of a server in the middle of a turn: the other continues the session, losing only
     the turn in flight, once the earlier turns' writes behind have landed (after the dead
     server's lease expires: FAILED_PRECONDITION until then, naming the replica);
  3. SIGTERM flushes: a turn's state reaches Redis before the process exits, and a new server
     continues it;
  4. Redis restarted (empty): a server holding the session continues from memory and writes it
     back; one that does not hold it gets UNAVAILABLE naming Redis while it is down, then continues
     once the state is back;
  5. Redis unreachable at start: the server starts, serves sessions from memory, counts the errors
     (polysketch_state_tier_errors_total{kind="unreachable"});
  6. a session id nobody knows is NOT_FOUND and counted as the client's error
     (reason="validation"), not reason="internal";
  7. shared prefixes: a long system prompt computed by one server is restored by another, which
     then prefills only the rest of the prompt (FinalInfo prompt_tokens - cached_tokens: the
     prefill it computed; wall time is bench/state_tier.py's), with the same output as a server
     that computed it all; another cache_salt finds nothing.

Usage: state_tier_test.py <polysketch-server> <repo root> <build dir>
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional

import grpc

SERVER, ROOT, BUILD = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, os.path.join(BUILD, "python"))
from polysketch_client._proto import generation_pb2 as pb  # noqa: E402
from polysketch_client._proto import generation_pb2_grpc as pbg  # noqa: E402

MODEL = os.path.join(ROOT, "tests", "golden", "polysketch-learned-local")
LOG_DIR = tempfile.mkdtemp(prefix="state_tier_test-")
CODE = grpc.StatusCode
LEASE = "2s"
TURNS = [b"In the beginning ", b"God created the heaven ", b"and the earth. ",
         b"And the earth was without form, ", b"and void; ", b"and darkness was upon the deep. "]


def fail(message: str) -> None:
    print(f"FAIL: {message} (logs in {LOG_DIR})", file=sys.stderr, flush=True)
    raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server on a free loopback port, persistence off."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            fail("redis-server is not installed (scripts/setup-deps installs it)")
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", LOG_DIR,
             "--logfile", os.path.join(LOG_DIR, f"redis-{time.monotonic_ns()}.log")],
            stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.025)
        fail("redis-server does not answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Server:
    """A polysketch-server on loopback; stderr goes to a log file."""

    def __init__(self, name: str, redis_port: Optional[int]) -> None:
        self.name = name
        self.log_path = os.path.join(LOG_DIR, f"{name}.log")
        self.log = open(self.log_path, "w")
        args = [SERVER, "--model", MODEL, "--host", "127.0.0.1", "--port", "0",
                "--metrics_host", "127.0.0.1", "--metrics_port", "0", "--http_port", "-1",
                "--threads", "1", "--slots", "2", "--max_new_tokens_limit", "100000",
                "--drain_timeout", "2s", "--replica_id", name]
        if redis_port is not None:
            args += ["--state_tier", f"127.0.0.1:{redis_port}", "--state_tier_lease", LEASE,
                     "--state_tier_lease_wait", "200ms",
                     "--state_tier_timeout", "500ms"]
        self.proc = subprocess.Popen(args, stderr=self.log, stdout=subprocess.DEVNULL)
        ready = re.compile(r"^polysketch-server: serving .* on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")
        for _ in range(600):
            if self.proc.poll() is not None:
                fail(f"{name} exited at start: {self.tail()}")
            with open(self.log_path) as f:
                for line in f:
                    m = ready.match(line)
                    if m:
                        self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
                        self.stub = pbg.GenerationServiceStub(self.channel)
                        return
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        fail(f"{name} printed no ready line in 30 s: {self.tail()}")

    def tail(self) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-20:])

    def metrics(self) -> Dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        values = {}
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def open_session(self) -> bytes:
        return self.stub.OpenSession(pb.OpenSessionRequest(), timeout=30).session_id.encode()

    def generate(self, text: bytes, n: int = 8, salt: bytes = b"") -> pb.GenerateResponse:
        return self.stub.Generate(
            pb.GenerateRequest(text=text, max_new_tokens=n, cache_salt=salt,
                               sampling=pb.SamplingParams(temperature=0.0)), timeout=60)

    def turn(self, session: bytes, text: bytes, n: int = 8) -> List[int]:
        response = self.stub.Generate(
            pb.GenerateRequest(text=text, session_id=session, max_new_tokens=n,
                               sampling=pb.SamplingParams(temperature=0.0)), timeout=60)
        return [t.token_id for t in response.tokens]

    def turn_retrying(self, session: bytes, text: bytes, n: int = 8) -> List[int]:
        """A turn, retried while another replica's lease holds the session (up to 15 s)."""
        end = time.monotonic() + 15
        while True:
            try:
                return self.turn(session, text, n)
            except grpc.RpcError as e:
                if e.code() != CODE.FAILED_PRECONDITION or time.monotonic() > end:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.channel.close()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        self.log.close()
        return self.tail()


def expect_code(call, code: grpc.StatusCode, words: str, what: str) -> None:
    try:
        call()
    except grpc.RpcError as e:
        if e.code() != code or words not in e.details():
            fail(f"{what}: got {e.code()} {e.details()!r}, want {code} naming {words!r}")
        print(f"  {what}: {e.code().name} \"{e.details()}\"")
        return
    fail(f"{what}: succeeded, want {code}")


def main() -> None:
    redis = Redis()
    servers: List[Server] = []
    try:
        # (Inside the try: a server that fails to start still stops Redis and the others.)
        reference = Server("reference", None)  # one process, no tier: the outputs to match
        servers.append(reference)
        a = Server("a", redis.port)
        servers.append(a)
        b = Server("b", redis.port)
        servers.append(b)
        # 1. Alternating replicas equal one process.
        ref_session = reference.open_session()
        session = a.open_session()
        want = [reference.turn(ref_session, t) for t in TURNS[:4]]
        got = [(a if i % 2 == 0 else b).turn_retrying(session, t) for i, t in enumerate(TURNS[:4])]
        if got != want:
            fail(f"alternating replicas: {got} != one process {want}")
        print("alternating replicas a, b, a, b: outputs equal one process")

        # 2. SIGKILL of b mid-turn: a continues; only the turn in flight is lost. The turns before
        # it are safe once their writes behind have landed (docs/sessions.md): wait for b's two
        # (turns 1 and 3), which a loaded machine can delay past the start of the next turn.
        deadline = time.monotonic() + 20
        while b.metrics().get("polysketch_state_tier_writes_total", 0) < 2:
            if time.monotonic() > deadline:
                fail(f"b's writes behind did not land in 20 s: {b.metrics()}")
            time.sleep(0.05)
        stream = b.stub.GenerateStream(
            pb.GenerateRequest(text=TURNS[4], session_id=session, max_new_tokens=100000,
                               sampling=pb.SamplingParams(temperature=0.0)), timeout=60)
        next(iter(stream))  # the turn runs on b
        b.kill()
        servers.remove(b)
        try:
            a.turn(session, TURNS[5])
            fail("a ran a turn while dead b still held the session's lease")
        except grpc.RpcError as e:
            if e.code() != CODE.FAILED_PRECONDITION or "replica b" not in e.details():
                fail(f"during b's lease: {e.code()} {e.details()!r}")
            print(f"  during dead b's lease: FAILED_PRECONDITION \"{e.details()}\"")
        start = time.monotonic()
        got = a.turn_retrying(session, TURNS[5])
        want = reference.turn(ref_session, TURNS[5])
        if got != want:
            fail(f"after SIGKILL: {got} != {want}")
        print(f"SIGKILL of b mid-turn: a continued after {time.monotonic() - start:.1f} s "
              "(b's lease), losing only the turn in flight")

        # 3. SIGTERM flushes: a's last turn reaches Redis before it exits; c continues it.
        want = reference.turn(ref_session, b" Let there be light.")
        a.turn(session, b" Let there be light.")
        log = a.stop()
        servers.remove(a)
        if "session writes to the state tier: all done" not in log:
            fail(f"a did not report its flush: {log}")
        c = Server("c", redis.port)
        servers.append(c)
        want = reference.turn(ref_session, b" And there was light.")
        got = c.turn(session, b" And there was light.")
        if got != want:
            fail(f"after SIGTERM: {got} != {want}")
        print("SIGTERM of a: its session reached Redis; new server c continued it")

        # 4. Redis restarted (empty).
        redis.stop()
        want = reference.turn(ref_session, b" And God saw")
        got = c.turn(session, b" And God saw")  # held by c: from memory
        if got != want:
            fail(f"Redis down, c from memory: {got} != {want}")
        d = Server("d", redis.port)
        servers.append(d)
        expect_code(lambda: d.turn(session, b" the light"), CODE.UNAVAILABLE,
                    f"127.0.0.1:{redis.port}", "Redis down, d does not hold the session")
        redis.start()
        time.sleep(1.2)  # the tiers retry their connections
        want = reference.turn(ref_session, b" the light,")
        got = c.turn(session, b" the light,")  # Redis is empty again: c writes the state back
        if got != want:
            fail(f"Redis back, c: {got} != {want}")
        want = reference.turn(ref_session, b" that it was good")
        got = d.turn_retrying(session, b" that it was good")
        if got != want:
            fail(f"Redis back, d continues: {got} != {want}")
        unreachable = c.metrics().get('polysketch_state_tier_errors_total{kind="unreachable"}')
        print("Redis restarted: c served from memory and wrote the session back; d continued it; "
              f"c counted {unreachable} unreachable errors")

        # 5. Redis unreachable at start.
        dead_port = free_port()
        e = Server("e", dead_port)
        servers.append(e)
        if "state tier not reachable" not in e.tail():
            fail(f"e did not say its tier is unreachable: {e.tail()}")
        s = e.open_session()
        e.turn(s, TURNS[0])
        e.turn(s, TURNS[1])
        m = e.metrics()
        if m.get('polysketch_state_tier_errors_total{kind="unreachable"}', 0) < 1:
            fail("e counted no unreachable errors")
        print("Redis unreachable at start: e serves sessions from memory, errors counted")

        # 6. An unknown session is the client's error.
        before = d.metrics()
        expect_code(lambda: d.turn(b"0123456789abcdef0123456789abcdef", b"x"), CODE.NOT_FOUND,
                    "not found", "unknown session")
        after = d.metrics()
        key = 'polysketch_request_failure_total{reason="%s"}'
        if after[key % "validation"] != before[key % "validation"] + 1 or \
                after[key % "internal"] != before[key % "internal"]:
            fail("unknown session not counted as validation")
        m = d.metrics()
        for name in ("polysketch_state_tier_lookups_total{result=\"hit\"}",
                     "polysketch_state_tier_bytes_total{direction=\"read\"}",
                     "polysketch_state_tier_operation_seconds_count{op=\"read\"}"):
            if m.get(name, 0) <= 0:
                fail(f"d's metric {name} is {m.get(name)}")
        print("unknown session: NOT_FOUND, counted as validation; tier metrics present")

        # 7. Shared prefixes: f computes a system prompt (twice, so that its prefix cache keeps
        # the state where the two prompts part); g, which never saw it, restores it from Redis.
        f = Server("f", redis.port)
        servers.append(f)
        system = (b"You are a careful assistant. Answer briefly and cite the verse. " * 2)[:100]
        # The questions part right after the system prompt, so that the state f keeps where its
        # two prompts part is the system prompt's.
        for question in (b"\n1 who?", b"\n2 when?"):
            f.generate(system + question)
        end = time.monotonic() + 10
        # Three snapshots: each prompt's last block boundary, and where they part.
        while f.metrics().get("polysketch_state_tier_prefix_writes_total", 0) < 3:
            if time.monotonic() > end:
                fail(f"f wrote no prefix snapshot to Redis: {f.tail()}")
            time.sleep(0.1)
        g = Server("g", redis.port)
        servers.append(g)
        prompt = system + b"\n3 where?"
        want = reference.generate(prompt)
        got = g.generate(prompt)
        computed = got.final.prompt_tokens - got.final.cached_tokens
        if [t.token_id for t in got.tokens] != [t.token_id for t in want.tokens]:
            fail("shared prefix: g's output differs from a server that computed it all")
        # The fixture's granularity is its local block, 8 tokens: the 100-byte system prompt is
        # 12 whole blocks.
        if want.final.cached_tokens != 0 or got.final.cached_tokens != 96:
            fail(f"shared prefix: cached {got.final.cached_tokens} on g, "
                 f"{want.final.cached_tokens} on the reference; want 96 and 0")
        if g.metrics().get("polysketch_state_tier_prefix_tokens_total") != 96:
            fail(f"g's polysketch_state_tier_prefix_tokens_total: {g.metrics()}")
        other = g.generate(prompt, salt=b"another user")
        if other.final.cached_tokens != 0:
            fail(f"another cache_salt got {other.final.cached_tokens} cached tokens")
        print(f"shared prefix: g prefilled {computed} of {got.final.prompt_tokens} prompt tokens "
              f"(the reference {want.final.prompt_tokens}), restoring 96 from f's snapshot; "
              "another cache_salt restored none")
    finally:
        for server in servers:
            server.stop()
        redis.stop()
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
