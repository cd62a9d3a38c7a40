"""train/samples.py: the known-word share it reports, that sampling is seeded and follows the
recurrent decode, and its refusals."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

import generate
import modelio
import samples
from helpers import make_model


def run(argv: List[str]) -> Tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["samples.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            samples.main()
    finally:
        sys.argv = saved
    return out.getvalue(), err.getvalue()


def test_known_share_counts_letter_runs_case_insensitively() -> None:
    vocab = samples.vocabulary("And God said, Let there be light: and there was LIGHT.")
    assert vocab == {"and", "god", "said", "let", "there", "be", "light", "was"}
    # "lig" and "xq" are not words of the text; digits and punctuation split words.
    assert samples.known_share("and GOD said lig, there9xq!", vocab) == (4, 6)
    assert samples.known_share("12 -- !!", vocab) == (0, 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("m") / "sk"
    layers = [{"kind": "polysketch", "sketch": "learned", "sketch_size": 4, "local_exact": True,
               "block_size": 8}]
    modelio.save_model_dir(make_model(layers, seed=3, vocab=256).float(), d)
    return d


def test_generate_is_seeded_and_matches_the_step_by_step_sampler(model_dir: Path) -> None:
    import torch
    model = modelio.load_model_dir(model_dir)
    a = samples.generate(model, b"In the beginning", 40, 1.0, seed=5)
    assert a == samples.generate(model, b"In the beginning", 40, 1.0, seed=5)
    assert a != samples.generate(model, b"In the beginning", 40, 1.0, seed=6)
    # The same draws by hand: dense forward over the growing sequence, generate.sample per byte.
    gen = torch.Generator().manual_seed(5)
    seq = list(b"In the beginning")
    with torch.no_grad():
        for _ in range(40):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(generate.sample(logits, 1.0, 0, 1.0, gen))
    assert bytes(seq[len(b"In the beginning"):]) == a


def test_report_and_json(model_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text("the beginning of the word\n" * 3)
    out, js = tmp_path / "s.md", tmp_path / "s.json"
    stdout, _ = run([str(model_dir), "--corpus", str(corpus), "--seeds", "0,1", "--max-tokens",
                     "30", "--out", str(out), "--json", str(js)])
    assert "| sk | 2 |" in stdout and out.read_text().strip() == stdout.strip()
    rec = json.loads(js.read_text())
    assert [s["seed"] for s in rec["samples"]] == [0, 1]
    for s in rec["samples"]:
        assert (s["known_words"], s["words"]) == samples.known_share(
            s["text"], samples.vocabulary(corpus.read_text()))


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "a"], "--seeds must be comma-separated integers"),
    (["--max-tokens", "0"], "need --max-tokens >= 1"),
    (["--prompts", ""], "a prompt is empty"),
    (["--corpus", "/nonexistent/train.txt"], "not found"),
])
def test_refusals(model_dir: Path, argv: List[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        run([str(model_dir), *argv])
    assert message in str(e.value)
