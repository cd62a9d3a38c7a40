"""The eval tool (clients/python/polysketch_eval) without a server: the passkey format, trials,
bucketing and scoring math, the tables, JSON and heat map, and argument validation. The server is
replaced by in-process backends: one that scores with the PyTorch reference (so perplexity is
checked against train/eval.py), and one that answers passkeys by reading the prompt."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import eval as reference_eval
from helpers import make_model
from polysketch_eval import backend as eval_backend
from polysketch_eval import cli, passkey, perplexity, retrieval
from polysketch_eval.backend import EvalError, ServerInfo

TEXT = (b"And God said, Let there be light: and there was light. And God saw the light, that it "
        b"was good: and God divided the light from the darkness.\n") * 40  # 5.7 KB, no digits
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# In-process backends
# ------------------------------------------------------------------------------------------------
class FakeBackend:
    """Limits of a roomy byte-level server; subclasses answer the requests."""

    def __init__(self, max_prompt_tokens: int = 1 << 20, max_context: int = 0,
                 tokenizer: str = "bytes", max_new_tokens: int = 4096) -> None:
        self.limits = ServerInfo("fake", tokenizer, max_prompt_tokens, max_context,
                                 max_new_tokens)
        self.prompts: List[bytes] = []

    def info(self) -> ServerInfo:
        return self.limits

    def require_prompt_logprobs(self) -> None:
        pass

    def prompt_logprobs(self, ids: Sequence[int]) -> List[float]:
        raise AssertionError("not expected")

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> bytes:
        raise AssertionError("not expected")


class TorchBackend(FakeBackend):
    """prompt_logprobs from the PyTorch reference in float64, through the chunked prefill."""

    def __init__(self, model: torch.nn.Module, chunk: int = 5) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk

    @torch.no_grad()
    def prompt_logprobs(self, ids: Sequence[int]) -> List[float]:
        self.prompts.append(bytes(ids))
        t = torch.tensor([list(ids)])
        logits = self.model.prefill_chunked(t[:, :-1], self.model.init_state(1), self.chunk)[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        return logp.gather(1, t[0, 1:, None])[:, 0].tolist()


class TableBackend(FakeBackend):
    """prompt_logprobs: entry i is -(i % 7 + 1) * 0.1 nats, whatever the prompt."""

    def prompt_logprobs(self, ids: Sequence[int]) -> List[float]:
        self.prompts.append(bytes(ids))
        return [-(i % 7 + 1) * 0.1 for i in range(len(ids) - 1)]


class ReaderBackend(FakeBackend):
    """Answers a passkey by reading the needle out of the prompt, but only when it sits in the
    first `reach` bytes (a model that retrieves at short range only)."""

    def __init__(self, reach: int) -> None:
        super().__init__()
        self.reach = reach

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> bytes:
        prompt = bytes(ids)
        self.prompts.append(prompt)
        m = re.search(rb"The pass key is ([0-9]{5})\.", prompt)
        assert m is not None and prompt.endswith(retrieval.question())
        said = m.group(1) if m.start() < self.reach else b"00000"
        return (said + b".\nAnd God said")[:max_new_tokens]


def run_cli(argv: List[str], backend: Optional[FakeBackend]) -> Tuple[int, str, str, List[str]]:
    """cli.main with this backend: (exit status, stdout, stderr, progress lines)."""
    progress: List[str] = []
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv, backend_factory=(lambda args: backend), log=progress.append)
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code)
    return code, out.getvalue(), err.getvalue(), progress


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.txt"
    path.write_bytes(TEXT)
    return path


# ------------------------------------------------------------------------------------------------
# retrieval: the shared format
# ------------------------------------------------------------------------------------------------
def test_format_pieces() -> None:
    assert retrieval.needle("12345") == (
        b"\nThe pass key is 12345. Remember it. 12345 is the pass key.\n")
    assert retrieval.question() == b"\nWhat is the pass key? The pass key is "
    assert retrieval.answer("12345") == b"12345.\n"
    assert retrieval.PROMPT_OVERHEAD_BYTES == len(retrieval.needle("99999")) + len(
        retrieval.question())
    assert retrieval.format_key(10000) == "10000" and retrieval.format_key(99999) == "99999"
    for bad in (9999, 100000, -1):
        with pytest.raises(ValueError, match="outside"):
            retrieval.format_key(bad)
    for bad in ("1234", "123456", "01234", "1234a"):
        with pytest.raises(ValueError, match="not 5 digits"):
            retrieval.needle(bad)


@pytest.mark.parametrize("offset", [0, 1, 50, 99, 100])
def test_build_prompt_places_the_needle_at_the_offset(offset: int) -> None:
    filler = bytes(range(65, 65 + 100))
    prompt = retrieval.build_prompt(filler, "31415", offset)
    assert len(prompt) == len(filler) + retrieval.PROMPT_OVERHEAD_BYTES
    assert prompt.index(retrieval.needle("31415")) == offset
    assert prompt[:offset] == filler[:offset]
    assert prompt.endswith(filler[offset:] + retrieval.question())
    sequence = retrieval.build_training_sequence(filler, "31415", offset)
    assert sequence == prompt + b"31415.\n"
    with pytest.raises(ValueError, match="offset 101"):
        retrieval.build_prompt(filler, "31415", 101)


def test_depth_offset_and_filler_bytes() -> None:
    assert retrieval.depth_offset(50, 1000) == 500
    assert retrieval.depth_offset(10, 999) == 99  # floor(99.9)
    assert retrieval.depth_offset(0.5, 100) == 0
    assert retrieval.depth_offset(29, 100) == 29  # not floor(28.999...) from 29 / 100 * 100
    assert retrieval.depth_offset(57, 100) == 57
    for bad in (0, 100, -3, 150):
        with pytest.raises(ValueError, match="outside \\(0, 100\\)"):
            retrieval.depth_offset(bad, 1000)
    assert retrieval.filler_bytes(1024) == 1024 - retrieval.PROMPT_OVERHEAD_BYTES
    assert retrieval.filler_bytes(retrieval.PROMPT_OVERHEAD_BYTES + 1) == 1
    with pytest.raises(ValueError, match="no room for filler"):
        retrieval.filler_bytes(retrieval.PROMPT_OVERHEAD_BYTES)


@pytest.mark.parametrize("generated, want", [
    (b"12345.\nAnd", "12345"), (b" 12345", "12345"), (b"The key is 54321.", "54321"),
    (b"123456", "123456"), (b"1234", "1234"), (b"12 345", "12"), (b"no digits", None),
    (b"", None), (b"\xff\xfe 77777", "77777"),
])
def test_extract_key(generated: bytes, want: Optional[str]) -> None:
    assert retrieval.extract_key(generated) == want


# ------------------------------------------------------------------------------------------------
# passkey: trials, scoring, table, heat map
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [retrieval.PROMPT_OVERHEAD_BYTES + 1, 1000, 1024, 4096])
@pytest.mark.parametrize("depth", [0.1, 10, 50, 90, 99.9])
def test_trial_length_and_depth_are_exact(length: int, depth: float) -> None:
    trial = passkey.make_trial(TEXT, length, depth, index=3, seed=7)
    num_filler = length - retrieval.PROMPT_OVERHEAD_BYTES
    assert len(trial.prompt) == length
    assert trial.offset == math.floor(depth * num_filler / 100)
    assert trial.prompt.find(retrieval.needle(trial.key)) == trial.offset
    filler = TEXT[trial.filler_start:trial.filler_start + num_filler]
    assert trial.prompt == retrieval.build_prompt(filler, trial.key, trial.offset)
    assert re.fullmatch(rb"[1-9][0-9]{4}", trial.key.encode())


def test_trials_are_reproducible_and_vary() -> None:
    a = [passkey.make_trial(TEXT, 1024, 50, i, seed=1) for i in range(20)]
    b = [passkey.make_trial(TEXT, 1024, 50, i, seed=1) for i in range(20)]
    assert a == b
    assert len({t.key for t in a}) >= 18  # 20 draws from 90000 keys: collisions are rare
    assert len({t.filler_start for t in a}) >= 18
    other_seed = [passkey.make_trial(TEXT, 1024, 50, i, seed=2).key for i in range(20)]
    assert other_seed != [t.key for t in a]


def test_trial_refuses_text_too_short() -> None:
    with pytest.raises(ValueError, match="needs .* filler bytes; the text has 100"):
        passkey.make_trial(TEXT[:100], 1024, 50, 0, seed=0)


def test_score_answer_is_exact_match() -> None:
    trial = passkey.make_trial(TEXT, 1024, 50, 0, seed=0)
    assert passkey.score_answer(trial, trial.key.encode() + b".\n")["correct"] is True
    assert passkey.score_answer(trial, b" " + trial.key.encode())["correct"] is True
    assert passkey.score_answer(trial, trial.key.encode() + b"0")["correct"] is False
    assert passkey.score_answer(trial, trial.key[:4].encode())["correct"] is False
    record = passkey.score_answer(trial, b"nothing")
    assert record["correct"] is False and record["extracted"] is None
    assert record["key"] == trial.key and record["offset"] == trial.offset


def test_markdown_table_and_heatmap(tmp_path: Path) -> None:
    lengths, depths = [1024, 4096], [10.0, 90.0]
    cells = [passkey.cell_result(n, d, [{"correct": c} for c in pattern])
             for (n, d), pattern in zip([(1024, 10.0), (1024, 90.0), (4096, 10.0), (4096, 90.0)],
                                        [[1, 1], [1, 0], [0, 0], [1, 1, 1, 0]])]
    table = passkey.markdown_table(cells, lengths, depths, perplexity.size_label)
    assert table.splitlines() == [
        "| depth \\ length | 1k | 4k |",
        "|---|---|---|",
        "| 10% | 1.00 | 0.00 |",
        "| 90% | 0.50 | 0.75 |",
        "| mean | 0.75 | 0.38 |",
    ]
    pytest.importorskip("matplotlib")
    png = tmp_path / "heat.png"
    passkey.heatmap_png(cells, lengths, depths, perplexity.size_label, "test", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# perplexity: windows, buckets, scoring
# ------------------------------------------------------------------------------------------------
def test_bucket_edges_and_labels() -> None:
    assert perplexity.bucket_edges(256) == [(0, 256)]
    assert perplexity.bucket_edges(1024) == [(0, 1024)]
    assert perplexity.bucket_edges(1025) == [(0, 1024), (1024, 1025)]
    assert perplexity.bucket_edges(3000) == [(0, 1024), (1024, 2048), (2048, 3000)]
    assert perplexity.bucket_edges(65536) == [(0, 1024), (1024, 2048), (2048, 4096),
                                             (4096, 8192), (8192, 16384), (16384, 32768),
                                             (32768, 65536)]
    assert [perplexity.bucket_label(*e) for e in perplexity.bucket_edges(3000)] == [
        "0-1k", "1k-2k", "2k-3000"]
    assert perplexity.bucket_label(0, 256) == "0-256"


def test_windows_are_those_of_the_reference() -> None:
    data = bytes(range(256)) * 3
    cut = perplexity.windows(data, 100, max_bytes=350)
    assert cut == [data[0:100], data[100:200], data[200:300]]
    whole = perplexity.windows(data, 100, max_bytes=10_000)  # 768 bytes: 7 windows, 68 left
    assert len(whole) == 7 and whole[-1] == data[600:700]
    with pytest.raises(ValueError, match="shorter than one window of 1000"):
        perplexity.windows(data, 1000, max_bytes=10_000)
    with pytest.raises(ValueError, match="below 4"):
        perplexity.windows(data, 3, max_bytes=10_000)


def test_accumulator_against_a_hand_computation() -> None:
    """L = 2050: buckets [0, 1k), [1k, 2k), [2k, 2050); entry i scores position i + 1."""
    L = 2050
    acc = perplexity.Accumulator(L)
    lp = [-(i % 7 + 1) * 0.1 for i in range(L - 1)]
    acc.add_window(lp)
    acc.add_window([-1.0] * (L - 1))
    nll1 = [-x for x in lp]
    nll2 = [1.0] * (L - 1)
    r = acc.result()
    assert r["windows"] == 2 and r["scored_bytes"] == 2 * (L - 1)
    assert r["bpb_all"] == pytest.approx((sum(nll1) + sum(nll2)) / (2 * (L - 1)) / LN2,
                                         rel=1e-12)
    q = L // 4
    assert r["tail_bytes"] == 2 * q
    assert r["bpb_tail"] == pytest.approx((sum(nll1[-q:]) + q) / (2 * q) / LN2, rel=1e-12)
    b = r["buckets"]
    assert [(x["lo"], x["hi"], x["scored_bytes"]) for x in b] == [
        (0, 1024, 2 * 1023), (1024, 2048, 2 * 1024), (2048, 2050, 2 * 2)]
    assert b[0]["bpb"] == pytest.approx((sum(nll1[0:1023]) + 1023) / 2046 / LN2, rel=1e-12)
    assert b[1]["bpb"] == pytest.approx((sum(nll1[1023:2047]) + 1024) / 2048 / LN2, rel=1e-12)
    assert b[2]["bpb"] == pytest.approx((nll1[2047] + nll1[2048] + 2) / 4 / LN2, rel=1e-12)
    # Every scored byte is in exactly one bucket.
    assert sum(x["scored_bytes"] for x in b) == r["scored_bytes"]


def test_accumulator_refuses_bad_input() -> None:
    acc = perplexity.Accumulator(10)
    with pytest.raises(ValueError, match="9 scored bytes, got 10"):
        acc.add_window([-1.0] * 10)
    with pytest.raises(ValueError, match="positive, infinite or NaN"):
        acc.add_window([-1.0] * 8 + [float("nan")])
    with pytest.raises(ValueError, match="positive, infinite or NaN"):
        acc.add_window([-1.0] * 8 + [0.5])


LOCAL = {"kind": "polysketch", "sketch": "learned", "sketch_size": 4, "local_exact": True,
         "block_size": 8}


@pytest.mark.parametrize("L", [16, 40])
def test_perplexity_equals_the_reference_eval(L: int) -> None:
    """run_perplexity over the reference model's prompt log-probabilities == train/eval.py's
    evaluate() on the same text: same windows, same "all" and "tail"."""
    model = make_model([LOCAL, {"kind": "softmax"}], seed=3, vocab=256)
    data = TEXT[:300]
    results = cli.run_perplexity(TorchBackend(model), data, [L], 250, log=lambda s: None)
    want_all, want_tail = reference_eval.evaluate(model, np.frombuffer(data, dtype=np.uint8), L,
                                                  250, chunk=7)
    # Both sum the same float64 log-probabilities, in another order.
    assert results[0]["bpb_all"] == pytest.approx(want_all, rel=1e-12)
    assert results[0]["bpb_tail"] == pytest.approx(want_tail, rel=1e-12)
    assert results[0]["windows"] == 250 // L


# ------------------------------------------------------------------------------------------------
# The command line: JSON, tables, progress, validation
# ------------------------------------------------------------------------------------------------
def test_perplexity_cli_json_table_and_progress(text_file: Path, tmp_path: Path) -> None:
    out, table = tmp_path / "ppl.json", tmp_path / "ppl.md"
    backend = TableBackend()
    code, stdout, stderr, progress = run_cli(
        ["perplexity", "--data", str(text_file), "--lengths", "1k,1500", "--max_bytes", "3100",
         "--out", str(out), "--table", str(table)], backend)
    assert code == 0, stderr
    r = json.loads(out.read_text())
    assert r["eval"] == "perplexity" and r["version"] == 1 and r["model"] == "fake"
    assert r["data"] == {"path": str(text_file), "bytes": len(TEXT),
                         "sha256": hashlib.sha256(TEXT).hexdigest()}
    assert r["max_bytes"] == 3100 and r["elapsed_seconds"] >= 0
    assert [x["length"] for x in r["results"]] == [1024, 1500]
    assert [x["windows"] for x in r["results"]] == [3, 2]
    # The windows the server was asked to score: consecutive, from byte 0.
    assert backend.prompts == [TEXT[i * 1024:(i + 1) * 1024] for i in range(3)] + [
        TEXT[i * 1500:(i + 1) * 1500] for i in range(2)]
    nll = [(i % 7 + 1) * 0.1 for i in range(1023)]
    assert r["results"][0]["bpb_all"] == pytest.approx(sum(nll) / 1023 / LN2, rel=1e-12)
    assert [b["label"] for b in r["results"][1]["buckets"]] == ["0-1k", "1k-1500"]
    assert table.read_text() == stdout
    assert stdout.splitlines()[0] == "| length | windows | all | tail | 0-1k | 1k-1500 |"
    assert len([p for p in progress if "window" in p]) == 5
    assert "window 3/3" in progress[3] and "running" in progress[3] and "elapsed" in progress[3]


def test_passkey_cli_json_table_heatmap(text_file: Path, tmp_path: Path) -> None:
    out, table, png = tmp_path / "pk.json", tmp_path / "pk.md", tmp_path / "pk.png"
    pytest.importorskip("matplotlib")
    backend = ReaderBackend(reach=600)
    code, stdout, stderr, progress = run_cli(
        ["passkey", "--data", str(text_file), "--lengths", "512,1k", "--depths", "10,90",
         "--keys", "3", "--seed", "5", "--out", str(out), "--table", str(table),
         "--plot", str(png)], backend)
    assert code == 0, stderr
    r = json.loads(out.read_text())
    assert r["eval"] == "passkey" and r["lengths"] == [512, 1024] and r["depths"] == [10.0, 90.0]
    assert r["keys_per_cell"] == 3 and r["seed"] == 5 and r["max_new_tokens"] == 8
    assert r["format"]["question"] == retrieval.QUESTION
    assert [(c["length"], c["depth"], c["trials"]) for c in r["cells"]] == [
        (512, 10.0, 3), (512, 90.0, 3), (1024, 10.0, 3), (1024, 90.0, 3)]
    # The reader sees needles in the first 600 bytes only: 1k at depth 90% is out of reach.
    assert [c["accuracy"] for c in r["cells"]] == [1.0, 1.0, 1.0, 0.0]
    assert r["accuracy"] == pytest.approx(0.75)
    for cell in r["cells"]:
        for i, a in enumerate(cell["answers"]):
            trial = passkey.make_trial(TEXT, cell["length"], cell["depth"], i, 5)
            assert a["key"] == trial.key and a["offset"] == trial.offset
            assert a["correct"] == (a["extracted"] == a["key"])
    assert len(backend.prompts) == 12 and all(len(p) in (512, 1024) for p in backend.prompts)
    assert table.read_text() == stdout and "| 90% | 1.00 | 0.00 |" in stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(progress) == 5 and "1k depth=90%: 0/3 correct" in progress[-1]
    assert "9/12 = 0.750" in progress[-1]


@pytest.mark.parametrize("argv, message", [
    (["passkey", "--depths", "0"], "--depths: 0 is outside (0, 100)"),
    (["passkey", "--depths", "10,100"], "--depths: 100 is outside (0, 100)"),
    (["passkey", "--depths", "-5"], "--depths: -5 is outside (0, 100)"),
    (["passkey", "--depths", "ten"], "--depths: 'ten' is not a number"),
    (["passkey", "--depths", "50,50"], "depth 50 is given twice"),
    (["passkey", "--lengths", "0"], "--lengths: '0' is not a length"),
    (["passkey", "--lengths", "4q"], "--lengths: '4q' is not a length"),
    (["passkey", "--lengths", "1k,1024"], "length 1024 is given twice"),
    (["passkey", "--lengths", "64"], "leaves no room for filler"),
    (["passkey", "--keys", "0"], "--keys must be >= 1"),
    (["passkey", "--max_new_tokens", "4"], "--max_new_tokens must be >= 5"),
    (["perplexity", "--lengths", "3"], "3 is below 4"),
    (["perplexity", "--lengths", "4k", "--max_bytes", "1000"], "4096 is above --max_bytes"),
    (["perplexity", "--max_bytes", "0"], "--max_bytes must be >= 1"),
    (["--timeout", "0", "perplexity"], "--timeout and --connect_timeout must be > 0"),
    (["perplexity", "--out", "/no/such/dir/r.json"], "--out /no/such/dir/r.json"),
])
def test_bad_arguments_exit_2_with_a_clear_error(argv: List[str], message: str,
                                                 text_file: Path) -> None:
    code, stdout, stderr, _ = run_cli(argv + ["--data", str(text_file)], FakeBackend())
    assert code == 2
    assert stdout == ""
    assert message in stderr, stderr


def test_data_problems_exit_2(tmp_path: Path, text_file: Path) -> None:
    code, _, stderr, _ = run_cli(["passkey", "--data", str(tmp_path / "none.txt")],
                                 FakeBackend())
    assert code == 2 and "none.txt is missing" in stderr
    (tmp_path / "empty.txt").write_bytes(b"")
    code, _, stderr, _ = run_cli(["perplexity", "--data", str(tmp_path / "empty.txt")],
                                 FakeBackend())
    assert code == 2 and "empty.txt is empty" in stderr
    code, _, stderr, _ = run_cli(["passkey", "--data", str(text_file), "--lengths", "8k"],
                                 FakeBackend())
    assert code == 2 and "needs" in stderr and f"the text has {len(TEXT)}" in stderr
    code, _, stderr, _ = run_cli(["perplexity", "--data", str(text_file), "--lengths", "8k",
                                  "--max_bytes", "100000"], FakeBackend())
    assert code == 2 and "shorter than one window of 8192" in stderr


def test_lengths_beyond_the_server_limits_exit_2_before_any_request(text_file: Path) -> None:
    backend = TableBackend(max_prompt_tokens=2000, max_context=3000)
    code, _, stderr, _ = run_cli(["perplexity", "--data", str(text_file), "--lengths",
                                  "1k,2k,4k", "--max_bytes", "5000"], backend)
    assert code == 2
    assert "length 2048 is above the server's max_prompt_tokens 2000" in stderr
    assert "length 4096 is above the server's max_prompt_tokens 2000" in stderr
    assert "1024" not in stderr and backend.prompts == []

    backend = ReaderBackend(reach=0)
    backend.limits = ServerInfo("fake", "bytes", 5000, 1030, 4096)
    code, _, stderr, _ = run_cli(["passkey", "--data", str(text_file), "--lengths", "1k",
                                  "--keys", "1"], backend)
    assert code == 2
    assert "length 1024 + 8 new tokens is above the server's max_context 1030" in stderr
    backend.limits = ServerInfo("fake", "bytes", 5000, 0, 6)
    code, _, stderr, _ = run_cli(["passkey", "--data", str(text_file), "--lengths", "1k",
                                  "--keys", "1"], backend)
    assert code == 2 and "--max_new_tokens 8 is above the server's limit 6" in stderr
    backend.limits = ServerInfo("fake", "sentencepiece", 5000, 0, 4096)
    code, _, stderr, _ = run_cli(["passkey", "--data", str(text_file), "--lengths", "1k",
                                  "--keys", "1"], backend)
    assert code == 2 and "tokenizer is 'sentencepiece'" in stderr
    assert backend.prompts == []


def test_plot_without_matplotlib_is_refused_before_the_run(
        text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    backend = ReaderBackend(reach=0)
    code, _, stderr, _ = run_cli(["passkey", "--data", str(text_file), "--lengths", "1k",
                                  "--keys", "1", "--plot", str(tmp_path / "p.png")], backend)
    assert code == 2 and "--plot needs matplotlib" in stderr
    assert backend.prompts == []


def test_a_failing_server_exits_1(text_file: Path) -> None:
    class Down(FakeBackend):
        def info(self) -> ServerInfo:
            raise EvalError("GetModelInfo to x failed: UNAVAILABLE: connection refused")

    code, stdout, stderr, _ = run_cli(["passkey", "--data", str(text_file), "--lengths", "1k"],
                                      Down())
    assert code == 1 and stdout == ""
    assert "UNAVAILABLE: connection refused" in stderr


# ------------------------------------------------------------------------------------------------
# The gRPC layer's checks of what a server returns (a fake client, no stubs needed)
# ------------------------------------------------------------------------------------------------
class RpcError(Exception):
    """Stands for polysketch_client.PolysketchError."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class _Token:
    def __init__(self, token_id: int, logprob: float) -> None:
        self.token_id, self.logprob = token_id, logprob


class _Final:
    def __init__(self, reason: str) -> None:
        self.finish_reason, self.error_message = reason, ""


class _Chunk:
    def __init__(self, prompt_logprobs=(), tokens=(), final=None) -> None:
        self.prompt_logprobs, self.tokens, self.final = list(prompt_logprobs), list(tokens), final


class _Client:
    target = "fake:1"

    def __init__(self, chunks: List[_Chunk]) -> None:
        self.chunks, self.calls = chunks, []

    def generate_stream(self, prompt, **params):
        self.calls.append(params)
        yield from self.chunks


@pytest.fixture()
def stubs_have_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_backend, "client_has_prompt_logprobs", lambda: True)


def test_server_backend_collects_prompt_logprobs(stubs_have_the_field: None) -> None:
    ids = [65, 66, 67, 68]
    chunks = [_Chunk([_Token(66, -0.5)]), _Chunk([_Token(67, -1.5), _Token(68, -2.0)]),
              _Chunk(final=_Final("LENGTH"))]
    client = _Client(chunks)
    got = eval_backend.ServerBackend(client, 5.0, 1.0, RpcError).prompt_logprobs(ids)
    assert got == [-0.5, -1.5, -2.0]
    assert client.calls == [{"max_new_tokens": 0, "prompt_logprobs": True, "timeout": 5.0}]


@pytest.mark.parametrize("chunks, message", [
    ([_Chunk([_Token(66, -0.5)]), _Chunk(final=_Final("LENGTH"))],
     "returned 1 prompt log-probabilities for a prompt of 4 tokens (want 3)"),
    ([_Chunk([_Token(66, -0.5), _Token(99, -1.0), _Token(68, -1.0)], final=_Final("LENGTH"))],
     "entry 1 is token 99, the prompt has 67 there"),
    ([_Chunk(tokens=[_Token(1, -1.0)])], "generated tokens for max_new_tokens=0"),
    ([_Chunk([_Token(66, -0.5)])], "ended with no final message"),
    ([_Chunk(final=_Final("DEADLINE"))], "ended with DEADLINE"),
])
def test_server_backend_refuses_a_broken_response(chunks: List[_Chunk], message: str,
                                                  stubs_have_the_field: None) -> None:
    with pytest.raises(EvalError, match=re.escape(message)):
        backend = eval_backend.ServerBackend(_Client(chunks), 5.0, 1.0, RpcError)
        backend.prompt_logprobs([65, 66, 67, 68])


def test_server_backend_needs_the_proto_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_backend, "client_has_prompt_logprobs", lambda: False)
    backend = eval_backend.ServerBackend(_Client([]), 5.0, 1.0, RpcError)
    with pytest.raises(EvalError, match="without GenerateRequest.prompt_logprobs"):
        backend.require_prompt_logprobs()
    with pytest.raises(EvalError, match="without GenerateRequest.prompt_logprobs"):
        backend.prompt_logprobs([1, 2])


class _InfoClient(_Client):
    def __init__(self, error: Optional[RpcError] = None, tokens: Sequence[int] = (),
                 reason: str = "LENGTH") -> None:
        super().__init__([])
        self.error, self.tokens, self.reason = error, tokens, reason

    def model_info(self, timeout: float):
        self.calls.append({"timeout": timeout})
        raise self.error

    def generate(self, prompt, **params):
        self.calls.append(params)
        if self.error:
            raise self.error

        class Result:
            tokens = [_Token(t, -1.0) for t in self.tokens]
            final = _Final(self.reason)
        return Result()


def test_server_backend_turns_rpc_errors_into_eval_errors() -> None:
    client = _InfoClient(RpcError("UNAVAILABLE", "connection refused"))
    backend = eval_backend.ServerBackend(client, 5.0, 1.5, RpcError)
    with pytest.raises(EvalError, match=r"GetModelInfo to fake:1 failed: UNAVAILABLE: "
                                        r"connection refused \(is a server listening"):
        backend.info()
    assert client.calls == [{"timeout": 1.5}]  # the connect deadline, not the request's
    with pytest.raises(EvalError, match="Generate to fake:1 failed: UNAVAILABLE"):
        backend.greedy([65, 66], 8)
    assert client.calls[-1] == {"max_new_tokens": 8, "temperature": 0.0, "timeout": 5.0}


def test_server_backend_greedy_returns_bytes() -> None:
    backend = eval_backend.ServerBackend(_InfoClient(tokens=[49, 50, 51, 46]), 5.0, 1.0, RpcError)
    assert backend.greedy([65], 4) == b"123."
    failing = eval_backend.ServerBackend(_InfoClient(tokens=[49], reason="DEADLINE"), 5.0, 1.0,
                                         RpcError)
    with pytest.raises(EvalError, match="ended with DEADLINE"):
        failing.greedy([65], 4)


def test_cmake_copies_every_module_of_the_package() -> None:
    """build/python/polysketch_eval is assembled by clients/CMakeLists.txt from a list of files:
    a module missing from it would be missing from the built tool."""
    from conftest import CLIENTS_PYTHON_DIR, REPO_DIR

    cmake = (REPO_DIR / "clients" / "CMakeLists.txt").read_text()
    m = re.search(r"set\(PS_EVAL_SOURCES ([^)]*)\)", cmake)
    assert m is not None
    listed = set(m.group(1).split())
    present = {p.name for p in (CLIENTS_PYTHON_DIR / "polysketch_eval").glob("*.py")}
    assert listed == present
