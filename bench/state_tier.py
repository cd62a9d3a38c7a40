"""What the shared state tier costs and buys (issue 17, docs/sessions.md "Shared tier"): time to
first token of the turns of a conversation
  (a) in a session, every turn on the same replica (the state is in its memory);
  (b) in a session, turns alternating between two replicas sharing one Redis (every turn after
      the first loads the state another replica wrote);
  (c) without a session, resending the whole history each turn (prefix cache on, the default);
and the bytes moved to and from Redis per turn (polysketch_state_tier_bytes_total of both
replicas). The three run interleaved, turn by turn, in one run, so a noisy machine affects them
alike.

Then shared prefixes (docs/sessions.md "Shared prefixes"): time to first token of a request with a
long system prompt (--prefix_bytes) and a short question
  (p1) cold: no replica computed the system prompt (a fresh cache_salt each time);
  (p2) on replica b, which never saw it, restoring the state replica a left in Redis;
  (p3) on replica a, from its own prefix cache;
each trial in a scope of its own (a fresh cache_salt), interleaved, with the prompt tokens each
request prefilled (prompt_tokens - cached_tokens). --conversations 0 or --prefix_trials 0 skips
either part. Needs scripts/build and redis-server (scripts/setup-deps).

  /usr/bin/python3 bench/state_tier.py [--model models/tiny-polysketch] [--turns 10]
      [--turn_bytes 4000] [--max_new_tokens 64] [--conversations 3] [--prefix_bytes 8000]
      [--prefix_trials 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
sys.path.insert(0, os.path.join(BUILD, "python"))
from polysketch_client._proto import generation_pb2 as pb  # noqa: E402
from polysketch_client._proto import generation_pb2_grpc as pbg  # noqa: E402

TMP = tempfile.mkdtemp(prefix="state_tier_bench-")
WORDS = ("and the earth was without form and void darkness upon face of deep spirit god moved "
         "waters said let there be light saw that it good divided from called day night").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(seed: int, n: int) -> bytes:
    out, i = [], seed
    while sum(len(w) + 1 for w in out) < n:
        i = (i * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[i % len(WORDS)])
    return (" ".join(out)[:n]).encode()


class Server:
    def __init__(self, name: str, model: str, redis_port: int, extra: List[str]) -> None:
        self.log = open(os.path.join(TMP, f"{name}.log"), "w+")
        self.proc = subprocess.Popen(
            [os.path.join(BUILD, "polysketch-server"), "--model", model, "--host", "127.0.0.1",
             "--port", "0", "--metrics_host", "127.0.0.1", "--metrics_port", "0",
             "--http_port", "-1", "--slots", "2", "--replica_id", name,
             "--state_tier", f"127.0.0.1:{redis_port}"] + extra,
            stderr=self.log, stdout=subprocess.DEVNULL)
        ready = re.compile(r"^polysketch-server: serving .* on [^ ]+:(\d+), metrics on [^ ]+:(\d+)")
        for _ in range(1200):
            self.log.seek(0)
            for line in self.log:
                m = ready.match(line)
                if m:
                    self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                    self.stub = pbg.GenerationServiceStub(grpc.insecure_channel(
                        f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", -1)]))
                    return
            time.sleep(0.05)
        raise SystemExit(f"{name}: no ready line")

    def tier_bytes(self) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        total = 0.0
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            if line.startswith("polysketch_state_tier_bytes_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def counter(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def ttft(self, prompt: bytes, session: bytes, n: int,
             salt: bytes = b"") -> tuple[float, List[int], str]:
        """Seconds to the first generated token, the tokens and the text; retries a lease held
        briefly (the previous turn's write on another replica). self.final: the last FinalInfo."""
        for _ in range(100):
            start = time.perf_counter()
            first, tokens, out = None, [], ""
            try:
                for message in self.stub.GenerateStream(pb.GenerateRequest(
                        text=prompt, session_id=session, max_new_tokens=n, cache_salt=salt,
                        sampling=pb.SamplingParams(temperature=0.0)), timeout=300):
                    if message.tokens and first is None:
                        first = time.perf_counter() - start
                    tokens += [t.token_id for t in message.tokens]
                    out += message.text
                    if message.HasField("final"):
                        self.final = message.final
                return first or 0.0, tokens, out
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                time.sleep(0.01)
        raise SystemExit("lease never free")

    def settle(self, counter: str = "polysketch_state_tier_prefix_writes_total",
               at_least: float = 0) -> None:
        """Waits until `counter` reaches at_least and this replica's writes behind have landed
        (nothing queued and the counter still for 0.3 s: a write in flight is not queued)."""
        last, still, end = -1.0, 0, time.monotonic() + 60
        while time.monotonic() < end:
            now = self.counter(counter)
            queued = self.counter("polysketch_state_tier_queued_writes")
            still = still + 1 if now == last and queued == 0 and now >= at_least else 0
            if still >= 3:
                return
            last = now
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-polysketch"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn_bytes", type=int, default=4000)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--prefix_bytes", type=int, default=8000)
    parser.add_argument("--prefix_trials", type=int, default=5)
    args = parser.parse_args()
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", TMP],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    print(f"model {os.path.relpath(args.model, ROOT)}; {os.cpu_count()} cores")
    servers: List[Server] = []
    try:
        if args.conversations > 0:
            # Sessions only in the tier, so that its bytes per turn are the sessions'.
            servers = [Server(n, args.model, redis_port, ["--state_tier_prefix_ttl=0"])
                       for n in ("a", "b")]
            sessions(args, *servers)
            for server in servers:
                server.stop()
            servers = []
        if args.prefix_trials > 0:
            servers = [Server(n, args.model, redis_port, []) for n in ("a", "b")]
            prefixes(args, *servers)
    finally:
        for server in servers:
            server.stop()
        redis.kill()
        shutil.rmtree(TMP, ignore_errors=True)


def prefixes(args: argparse.Namespace, a: Server, b: Server) -> None:
    print(f"shared prefixes: {args.prefix_trials} trials, a {args.prefix_bytes}-byte system "
          f"prompt and a short question, {args.max_new_tokens}-token replies")
    system = text(77, args.prefix_bytes)
    ttft: Dict[str, List[float]] = {"cold": [], "tier": [], "local": []}
    prefilled: Dict[str, List[int]] = {"cold": [], "tier": [], "local": []}
    moved: List[float] = []
    for trial in range(args.prefix_trials):
        salt = f"trial {trial} {time.time_ns()}".encode()

        def ask(server: Server, key: str, question: bytes, scope: bytes) -> None:
            s, _, _ = server.ttft(system + question, b"", args.max_new_tokens, scope)
            ttft[key].append(s)
            prefilled[key].append(server.final.prompt_tokens - server.final.cached_tokens)

        ask(b, "cold", b"\n1. Who?", salt + b" cold")
        written = a.counter("polysketch_state_tier_prefix_writes_total")
        # a computes the system prompt, twice, so that it keeps (and writes) its state.
        a.ttft(system + b"\n2. What?", b"", args.max_new_tokens, salt)
        a.ttft(system + b"\n3. When?", b"", args.max_new_tokens, salt)
        a.settle(at_least=written + 1)  # a's writes behind land
        before = b.tier_bytes()
        ask(b, "tier", b"\n4. Where?", salt)
        moved.append(b.tier_bytes() - before)
        ask(a, "local", b"\n5. Why?", salt)
    print("TTFT (median / p90, ms) and prompt tokens prefilled (median):")
    for key, label in (("cold", "cold: nobody computed the system prompt"),
                       ("tier", "another replica's state, from Redis"),
                       ("local", "this replica's own prefix cache")):
        v = sorted(ttft[key])
        p90 = v[int(0.9 * (len(v) - 1))]
        line = (f"  {label:50s} {1000 * statistics.median(v):8.1f} / {1000 * p90:8.1f}"
                f"   {statistics.median(prefilled[key]):6.0f} tokens")
        if key == "tier":
            line += f"   {statistics.median(moved) / 1e6:6.2f} MB read"
        print(line)


def sessions(args: argparse.Namespace, a: Server, b: Server) -> None:
    print(f"sessions: {args.conversations} conversations of {args.turns} turns, "
          f"{args.turn_bytes}-byte turns, {args.max_new_tokens}-token replies")
    ttft: Dict[str, List[float]] = {"same": [], "other": [], "resend": []}
    moved: Dict[str, List[float]] = {"same": [], "other": []}
    for c in range(args.conversations):
        same = a.stub.OpenSession(pb.OpenSessionRequest()).session_id.encode()
        other = a.stub.OpenSession(pb.OpenSessionRequest()).session_id.encode()
        history = b""
        for t in range(args.turns):
            turn = text(1000 * c + t, args.turn_bytes)
            before = a.tier_bytes() + b.tier_bytes()
            writes = "polysketch_state_tier_writes_total"
            w_a = a.counter(writes)
            s_same, tok_same, reply = a.ttft(turn, same, args.max_new_tokens)
            a.settle(writes, w_a + 1)  # the turn's write behind lands
            mid = a.tier_bytes() + b.tier_bytes()
            replica = a if t % 2 == 0 else b
            w_replica = replica.counter(writes)
            s_other, tok_other, _ = replica.ttft(turn, other, args.max_new_tokens)
            replica.settle(writes, w_replica + 1)
            after = a.tier_bytes() + b.tier_bytes()
            s_resend, _, _ = a.ttft(history + turn, b"", args.max_new_tokens)
            if tok_same != tok_other:
                raise SystemExit(f"turn {t}: replicas disagree")
            history += turn + reply.encode()  # what the session holds, as text
            if t > 0:
                ttft["same"].append(s_same)
                ttft["other"].append(s_other)
                ttft["resend"].append(s_resend)
                moved["same"].append(mid - before)
                moved["other"].append(after - mid)
    print("TTFT of turns 2..N (median / p90, ms), bytes to and from Redis per turn:")
    for key, label in (("same", "session, same replica"),
                       ("other", "session, alternating replicas (state from Redis)"),
                       ("resend", "no session, history resent (prefix cache on)")):
        v = sorted(ttft[key])
        p90 = v[int(0.9 * (len(v) - 1))]
        line = f"  {label:50s} {1000 * statistics.median(v):8.1f} / {1000 * p90:8.1f}"
        if key in moved:
            line += f"   {statistics.median(moved[key]) / 1e6:6.2f} MB/turn"
        print(line)


if __name__ == "__main__":
    main()
