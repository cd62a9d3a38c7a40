"""The golden fixtures (tests/golden/*/golden.safetensors, format: tests/golden/README.md) agree
with the reference as it is now: each is recomputed in float64 from its model directory and
compared, so a change to train/model.py that moves any logit shows up here before in the engine."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

import golden
import modelio
from conftest import TRAIN_DIR
from helpers import decode, prefill

GOLDEN_DIR = TRAIN_DIR.parent / "tests" / "golden"
FIXTURES = sorted(p.parent for p in GOLDEN_DIR.glob("*/golden.safetensors"))
# The logits are stored as F32, which rounds a logit of size ~10 by up to ~5e-7; recomputing in
# float64 adds ~1e-14. 1e-5 is ~20x the storage rounding, far below what a changed reference moves.
ATOL = 1e-5
RTOL = 1e-5
# tensor -> (dtype, shape in the letters of the README: n prompt, P positions, G steps, V vocab)
LAYOUT: Dict[str, Tuple[torch.dtype, str]] = {
    "tokens": (torch.int32, "n"),
    "positions": (torch.int32, "P"),
    "prefill_logits": (torch.float32, "PV"),
    "greedy_tokens": (torch.int32, "G"),
    "decode_logits": (torch.float32, "GV"),
    "greedy_margins": (torch.float32, "G"),
}


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = torch.topk(logits, 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected.double(), atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: {m}")


def test_every_tiny_kind_has_a_fixture() -> None:
    have = {p.name for p in FIXTURES}
    assert set(golden.TINY_KINDS) <= have, sorted(set(golden.TINY_KINDS) - have)
    assert set(golden.TINY_POSITION_ENCODINGS) <= have, sorted(
        set(golden.TINY_POSITION_ENCODINGS) - have)


def test_fixture_configs_name_their_position_encoding() -> None:
    """The default-encoding fixtures' configs lack the key (as every model made before it did);
    the others carry theirs."""
    for name in golden.TINY_KINDS:
        assert "position_encoding" not in (GOLDEN_DIR / name / "config.json").read_text(), name
    for name, (kind, encoding) in golden.TINY_POSITION_ENCODINGS.items():
        cfg = modelio.load_config(GOLDEN_DIR / name)
        assert cfg.position_encoding == encoding, name
        assert cfg.layers == modelio.load_config(GOLDEN_DIR / kind).layers, name


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
def test_fixture_matches_reference(fixture: Path) -> None:
    tensors, meta = modelio.read_safetensors(fixture / "golden.safetensors")
    assert {"model_dir", "prefill_chunk", "description"} <= set(meta)
    assert set(tensors) == set(LAYOUT)
    tokens, positions = tensors["tokens"].long(), tensors["positions"].long()
    greedy = tensors["greedy_tokens"].long()
    sizes = {"n": tokens.numel(), "P": positions.numel(), "G": greedy.numel(),
             "V": tensors["prefill_logits"].shape[-1]}
    for name, (dtype, dims) in LAYOUT.items():
        assert tensors[name].dtype == dtype, name
        assert list(tensors[name].shape) == [sizes[d] for d in dims], name
    assert sizes["n"] > 0 and sizes["P"] > 0 and sizes["G"] > 0
    assert positions.tolist() == sorted(set(positions.tolist()))
    assert 0 <= positions[0] and positions[-1] < sizes["n"]
    assert float(tensors["greedy_margins"].min()) >= golden.MARGIN_MIN
    if "seed" in meta:  # a tiny random model, stored next to its fixture
        assert meta["model_dir"] == "."
        assert bytes(tokens.tolist()) == golden.TINY_PROMPT.encode()

    model_dir = fixture / meta["model_dir"]
    # Every fixture's model is checked in (tests/golden/<tiny>/ or models/): one that is missing
    # fails here, it is not skipped.
    assert (model_dir / "config.json").exists(), f"{fixture.name}: no model directory {model_dir}"
    model = modelio.load_model_dir(model_dir, torch.float64)
    assert model.cfg.vocab_size == sizes["V"]

    chunk = int(meta["prefill_chunk"])
    n = sizes["n"]
    chunks: List[int] = [min(chunk, n - s) for s in range(0, n, chunk)]
    logits, states = prefill(model, tokens[None], chunks)
    close(logits[0, positions], tensors["prefill_logits"], f"{fixture.name} prefill")

    steps = decode(model, torch.cat([tokens, greedy])[None], states, n)[0]  # [G, V]
    close(steps, tensors["decode_logits"], f"{fixture.name} decode")
    choosing = torch.cat([logits[0, -1:], steps[:-1]])  # the logits that chose greedy[g]
    assert torch.equal(torch.argmax(choosing, dim=-1), greedy), fixture.name
    close(top2_margin(choosing), tensors["greedy_margins"], f"{fixture.name} margins")
