"""The generation and evaluation scripts (train/generate.py, train/eval.py) on tiny model
directories: greedy and seeded sampling, the refusals, the sampler itself, the markdown table, and
the chunked-prefill scoring against the dense forward."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

import eval as evaluation
import generate
import modelio
from conftest import TRAIN_DIR
from helpers import dense, make_model

SKETCH_LOCAL: Dict[str, Any] = {"kind": "polysketch", "sketch": "learned", "sketch_size": 4,
                                "local_exact": True, "block_size": 8}
MODELS: Dict[str, List[Dict[str, Any]]] = {
    "sketchy": [SKETCH_LOCAL, {"kind": "softmax"}],
    "windowed": [{"kind": "sliding_window", "window": 5}],
}
PROMPT = "In the beginning God created"  # 28 bytes: several prefill chunks and sketch blocks
HELDOUT = ("And God said, Let there be light: and there was light. And God saw the light, that "
           "it was good: and God divided the light from the darkness.\n") * 4
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Tiny exported (f32) byte models with unit-scale weights, by name."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for seed, (name, layers) in enumerate(MODELS.items()):
        dirs[name] = root / name
        modelio.save_model_dir(make_model(layers, seed=seed, vocab=256).float(), dirs[name])
    return dirs


def run_main(main: Callable[[], None], argv: List[str]) -> Tuple[str, str]:
    """main() with these arguments; returns (stdout, stderr). SystemExit propagates."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["script.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    finally:
        sys.argv = saved
    return out.getvalue(), err.getvalue()


def refusal(main: Callable[[], None], argv: List[str]) -> str:
    """The message of the sys.exit(message) that main() must end with."""
    with pytest.raises(SystemExit) as info:
        run_main(main, argv)
    assert isinstance(info.value.code, str), info.value.code  # a message: exit status 1
    return info.value.code


# ------------------------------------------------------------------------------------------------
# generate.py
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def dense_greedy(model_dir: Path, prompt: bytes, n: int) -> bytes:
    """Greedy continuation by the float64 dense forward over the whole sequence at every step."""
    model = modelio.load_model_dir(model_dir, torch.float64)
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(torch.argmax(dense(model, torch.tensor([tokens]))[0, -1])))
    return bytes(tokens[len(prompt):])


def test_generate_greedy_is_the_dense_argmax(model_dirs: Dict[str, Path]) -> None:
    out, err = run_main(generate.main, ["--model", str(model_dirs["sketchy"]), "--prompt", PROMPT,
                                        "--max-tokens", "24", "--temperature", "0",
                                        "--chunk", "5"])
    continuation = dense_greedy(model_dirs["sketchy"], PROMPT.encode(), 24)
    assert out == PROMPT + continuation.decode("utf-8", errors="replace") + "\n"
    assert "generated 24 tokens" in err


def test_generate_same_seed_same_text(model_dirs: Dict[str, Path]) -> None:
    argv = ["--model", str(model_dirs["windowed"]), "--prompt", PROMPT, "--max-tokens", "32",
            "--temperature", "1.5", "--top-p", "0.9", "--seed", "3"]
    first, err = run_main(generate.main, argv)
    second, _ = run_main(generate.main, argv)
    assert first == second
    assert first.startswith(PROMPT)
    assert "generated 32 tokens" in err


def test_generate_refuses_empty_prompt(model_dirs: Dict[str, Path], tmp_path: Path) -> None:
    msg = refusal(generate.main, ["--model", str(model_dirs["sketchy"]), "--prompt", ""])
    assert "prompt is empty" in msg
    (tmp_path / "empty.txt").write_bytes(b"")
    msg = refusal(generate.main, ["--model", str(model_dirs["sketchy"]),
                                  "--prompt-file", str(tmp_path / "empty.txt")])
    assert "prompt is empty" in msg


def test_generate_refuses_missing_model_dir(tmp_path: Path) -> None:
    """Through the real command line: exit status and message on stderr."""
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, str(TRAIN_DIR / "generate.py"), "--model",
                           str(missing), "--prompt", "In"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"generate: {missing / 'config.json'}: not found" in proc.stderr


# ------------------------------------------------------------------------------------------------
# generate.sample
# ------------------------------------------------------------------------------------------------
def random_logits(seed: int, v: int = 50) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(4))
def test_sample_greedy_cases_are_argmax(seed: int) -> None:
    logits = random_logits(seed)
    best = int(torch.argmax(logits))
    gen = torch.Generator().manual_seed(seed)
    assert generate.sample(logits, 0.0, 0, 1.0, gen) == best
    assert generate.sample(logits, 0.0, 5, 0.5, gen) == best
    for temperature in (0.3, 1.0, 10.0):
        for _ in range(20):
            assert generate.sample(logits, temperature, 1, 1.0, gen) == best
            assert generate.sample(logits, temperature, 0, 1e-9, gen) == best


def test_sample_top_k_2_yields_only_the_two_best() -> None:
    logits = random_logits(7)
    two_best = set(torch.topk(logits, 2).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = {generate.sample(logits, 5.0, 2, 1.0, gen) for _ in range(200)}
    assert drawn == two_best  # both occur: at temperature 5 neither has p < 0.1


# ------------------------------------------------------------------------------------------------
# eval.py
# ------------------------------------------------------------------------------------------------
def test_eval_writes_a_table_row_per_model(model_dirs: Dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "heldout.txt"
    data.write_text(HELDOUT)
    table_path = tmp_path / "table.md"
    out, _ = run_main(evaluation.main, [str(model_dirs["sketchy"]), str(model_dirs["windowed"]),
                                        "--data", str(data), "--contexts", "16,32",
                                        "--max-bytes", "256", "--chunk", "12",
                                        "--out", str(table_path)])
    table = table_path.read_text()
    assert table in out
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model", "attention", "16 all", "16 tail", "32 all", "32 tail"]
    assert lines[1] == "|" + "---|" * 6
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == ["sketchy", "windowed"]
    assert rows[0][1] == "polysketch+local_exact(learned), softmax"
    assert rows[1][1] == "sliding_window"
    for row in rows:
        assert len(row) == 6
        assert all(math.isfinite(float(x)) and float(x) > 0 for x in row[2:])


def test_eval_refuses_missing_heldout(model_dirs: Dict[str, Path], tmp_path: Path) -> None:
    msg = refusal(evaluation.main, [str(model_dirs["sketchy"]), "--data",
                                    str(tmp_path / "none.txt")])
    assert "none.txt is missing" in msg


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_scores_equal_the_dense_cross_entropy(name: str) -> None:
    """Chunked prefill scoring (chunks of 5 across blocks of 8) == the dense forward's loss."""
    model = make_model(MODELS[name], seed=2, vocab=256)
    data = np.frombuffer(HELDOUT.encode(), dtype=np.uint8)
    L = 32
    allpos, tail = evaluation.evaluate(model, data, L, max_bytes=2 * L + 7, chunk=5)
    nll = []
    for w in range(2):  # the two whole windows within max_bytes
        window = torch.from_numpy(data[w * L:(w + 1) * L].astype(np.int64))
        logits = dense(model, window[None, :-1])[0]
        nll.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none"))
    want_all = float(torch.cat(nll).mean()) / LN2
    want_tail = float(torch.cat([x[-(L // 4):] for x in nll]).mean()) / LN2
    assert allpos == pytest.approx(want_all, rel=1e-12)
    assert tail == pytest.approx(want_tail, rel=1e-12)
    with pytest.raises(ValueError, match="shorter than context 64"):
        evaluation.evaluate(model, data[:63], 64, max_bytes=1000, chunk=5)


def test_eval_by_position_buckets_agree_with_the_summary(model_dirs: Dict[str, Path],
                                                         tmp_path: Path) -> None:
    """--by-position: the buckets (0-1k, 1k-2k: here all of a 2500-byte window's first 1k and
    the rest) average, weighted by bytes, to the same 'all' figure evaluate() gives."""
    text = (HELDOUT * 20)[:5000]
    data = tmp_path / "heldout.txt"
    data.write_text(text)
    js = tmp_path / "r.json"
    run_main(evaluation.main, [str(model_dirs["sketchy"]), "--data", str(data), "--contexts",
                               "2500", "--max-bytes", "5000", "--chunk", "300", "--by-position",
                               "--json", str(js)])
    rec = json.loads(js.read_text())["sketchy"][0]
    assert rec["windows"] == 2
    assert [b["label"] for b in rec["buckets"]] == ["0-1k", "1k-2k", "2k-2500"]
    assert sum(b["scored_bytes"] for b in rec["buckets"]) == 2 * 2499
    mixed = sum(b["bpb"] * b["scored_bytes"] for b in rec["buckets"]) / (2 * 2499)
    assert mixed == pytest.approx(rec["bpb_all"], rel=1e-9)
    model = modelio.load_model_dir(model_dirs["sketchy"])
    arr = np.frombuffer(text.encode(), dtype=np.uint8)
    want_all, want_tail = evaluation.evaluate(model, arr, 2500, 5000, 300)
    assert rec["bpb_all"] == pytest.approx(want_all, rel=1e-9)
    assert rec["bpb_tail"] == pytest.approx(want_tail, rel=1e-9)
