"""The eval tool over real gRPC: `python3 -m polysketch_eval` in a subprocess, with the client's
stubs generated from this tree's proto (clients/python/gen_stubs.sh, into a temporary folder).

Without a server: an unreachable or silent server ends the run within its deadline (exit 1).
With a server (models/tiny-polysketch, build/polysketch-server or $POLYSKETCH_BUILD_DIR): small
perplexity and passkey runs, the perplexity figures checked against the PyTorch reference
(train/eval.py) within 0.5%. The proto has GenerateRequest.prompt_logprobs (the promptlp merge), so
stubs without it are a failure here, not a reason to skip.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest

import eval as reference_eval
import modelio
from conftest import REPO_DIR

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
BUILD_DIR = Path(os.environ.get("POLYSKETCH_BUILD_DIR", REPO_DIR / "build"))
MODEL = REPO_DIR / "models" / "tiny-polysketch"
HELDOUT = REPO_DIR / "data" / "corpus" / "heldout.txt"
# The engine runs float32 kernels in another order than the float64-accumulated reference; the
# goal of issue 15 is agreement within 0.5% of bits per byte (observed differences are ~1e-5).
RTOL_BPB = 0.005


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PYTHONPATH folder with polysketch_client (stubs from proto/) and polysketch_eval."""
    out = tmp_path_factory.mktemp("python")
    proc = subprocess.run(["bash", str(REPO_DIR / "clients" / "python" / "gen_stubs.sh"),
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"gen_stubs.sh failed (protoc, grpc_python_plugin: " \
                                 f"scripts/setup-deps): {proc.stderr}"
    return out


def stubs_have_prompt_logprobs(stubs: Path) -> bool:
    """GenerateRequest.prompt_logprobs in the generated descriptor (the client's API)."""
    code = ("from polysketch_eval.backend import client_has_prompt_logprobs as f; "
            "print(f())")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(stubs)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip() == "True"


def run_eval(stubs: Path, args: List[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "polysketch_eval", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(stubs)})


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "filler.txt"
    path.write_bytes(b"Blessed are the meek: for they shall inherit the earth.\n" * 100)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_within_the_deadline(stubs: Path, text_file: Path) -> None:
    """Nothing listening: UNAVAILABLE at once. A socket that accepts and never answers:
    DEADLINE_EXCEEDED after --connect_timeout, never a hang."""
    args = ["passkey", "--data", str(text_file), "--lengths", "1k", "--keys", "1"]
    t0 = time.monotonic()
    proc = run_eval(stubs, ["--target", f"127.0.0.1:{free_port()}", "--connect_timeout", "5",
                            *args], timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "GetModelInfo" in proc.stderr and "UNAVAILABLE" in proc.stderr
    assert "is a server listening" in proc.stderr and time.monotonic() - t0 < 30

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        proc = run_eval(stubs, ["--target", f"127.0.0.1:{silent.getsockname()[1]}",
                                "--connect_timeout", "2", *args], timeout=60)
        elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert "DEADLINE_EXCEEDED" in proc.stderr, proc.stderr
    assert 2 <= elapsed < 30, elapsed


def test_perplexity_gets_as_far_as_the_server(stubs: Path, text_file: Path) -> None:
    """The stubs built from this tree's proto have the field, so the run is not stopped for the
    client's sake (test_eval_tool.py checks that message) and gets as far as the absent server."""
    assert stubs_have_prompt_logprobs(stubs), "proto/ lost GenerateRequest.prompt_logprobs"
    proc = run_eval(stubs, ["--target", f"127.0.0.1:{free_port()}", "perplexity", "--data",
                            str(text_file), "--lengths", "256"], timeout=60)
    assert proc.returncode == 1
    assert "GetModelInfo" in proc.stderr and "UNAVAILABLE" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------
# Against a server
# ------------------------------------------------------------------------------------------------
class Server:
    """polysketch-server on loopback with a free port; stderr to a log file."""

    def __init__(self, binary: Path, log: Path, *flags: str) -> None:
        self.log = log
        with open(log, "w") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [str(binary), "--model", str(MODEL), "--host", "127.0.0.1", "--port", "0",
                 "--metrics_host", "127.0.0.1", "--metrics_port", "0", "--http_port", "0",
                 "--threads", "1", *flags],
                stdout=subprocess.DEVNULL, stderr=stderr)
        ready = re.compile(r"^polysketch-server: serving .* on [^ ]+:(\d+), metrics on ")
        for _ in range(600):
            assert self.proc.poll() is None, f"server exited at start: {self.tail()}"
            for line in log.read_text().splitlines():
                m = ready.match(line)
                if m:
                    self.target = f"127.0.0.1:{m.group(1)}"
                    return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"no ready line in 30 s: {self.tail()}")

    def tail(self) -> str:
        return "".join(self.log.read_text().splitlines(keepends=True)[-20:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(stubs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    assert stubs_have_prompt_logprobs(stubs), "proto/ lost GenerateRequest.prompt_logprobs"
    binary = BUILD_DIR / "polysketch-server"
    assert binary.exists(), f"{binary} is missing: build it (scripts/build) or set " \
                            "POLYSKETCH_BUILD_DIR"
    # A prompt limit of 2048 tokens: the refusal of longer lengths is checked too.
    s = Server(binary, tmp_path_factory.mktemp("server") / "server.log", "--slots", "2",
               "--max_prompt_tokens", "2048")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def heldout() -> bytes:
    assert HELDOUT.exists(), f"{HELDOUT} is missing: /usr/bin/python3 train/corpus.py"
    return HELDOUT.read_bytes()


def test_perplexity_equals_the_reference(server: Server, stubs: Path, heldout: bytes,
                                         tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    proc = run_eval(stubs, ["--target", server.target, "--timeout", "120", "perplexity",
                            "--data", str(HELDOUT), "--lengths", "256", "--max_bytes", "512",
                            "--out", str(out)])
    assert proc.returncode == 0, proc.stderr + server.tail()
    r = json.loads(out.read_text())
    result = r["results"][0]
    assert r["model"] == "tiny-polysketch" and result["windows"] == 2
    assert result["scored_bytes"] == 2 * 255 and result["tail_bytes"] == 2 * 64
    model = modelio.load_model_dir(MODEL)
    want_all, want_tail = reference_eval.evaluate(model, np.frombuffer(heldout, dtype=np.uint8),
                                                  256, 512, chunk=128)
    assert result["bpb_all"] == pytest.approx(want_all, rel=RTOL_BPB)
    assert result["bpb_tail"] == pytest.approx(want_tail, rel=RTOL_BPB)
    [bucket] = result["buckets"]
    assert bucket["label"] == "0-256" and bucket["bpb"] == pytest.approx(result["bpb_all"])
    assert "window 2/2" in proc.stderr and "| 256 | 2 |" in proc.stdout


def test_passkey_cells_and_limits(server: Server, stubs: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "pk.json", tmp_path / "pk.png"
    proc = run_eval(stubs, ["--target", server.target, "--timeout", "120", "passkey", "--data",
                            str(HELDOUT), "--lengths", "1k", "--keys", "2", "--out", str(out),
                            "--plot", str(png)])
    assert proc.returncode == 0, proc.stderr + server.tail()
    r = json.loads(out.read_text())
    assert [(c["length"], c["depth"], c["trials"]) for c in r["cells"]] == [
        (1024, d, 2) for d in (10.0, 30.0, 50.0, 70.0, 90.0)]
    for cell in r["cells"]:
        assert 0.0 <= cell["accuracy"] <= 1.0
        for a in cell["answers"]:
            assert a["correct"] == (a["extracted"] == a["key"]) and a["answer"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert proc.stderr.count("passkey L=1k depth=") == 5

    # 4k is past the server's --max_prompt_tokens 2048 (read from GetModelInfo): refused first.
    proc = run_eval(stubs, ["--target", server.target, "passkey", "--data", str(HELDOUT),
                            "--lengths", "1k,4k", "--keys", "1"])
    assert proc.returncode == 2
    assert "length 4096 is above the server's max_prompt_tokens 2048" in proc.stderr
    assert "passkey L=" not in proc.stderr  # nothing ran
