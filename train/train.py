#!/usr/bin/python3
"""Trains a polysketchformer model on the byte corpus (train/corpus.py).

AdamW with linear warm-up and cosine decay, gradient clipping, periodic held-out evaluation,
atomic checkpoints with resume, and a progress line (loss, bits/byte, lr, tokens/s). The same code
runs on CPU and on CUDA. A run is defined by one JSON file (train/configs/*.json):
  {"model": <model config, docs/model-format.md>, "train": {<the keys of TrainConfig>}}
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The passkey format is shared with the eval tool (clients/python/polysketch_eval/retrieval.py):
# one source of truth, pure standard library.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))
import heap  # noqa: E402
from model import ModelConfig, PolySketchFormer  # noqa: E402
from modelio import load_model_dir  # noqa: E402
from polysketch_eval import retrieval  # noqa: E402

LN2 = math.log(2.0)


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_size: int = 8
    steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_windows: int = 32
    ckpt_every: int = 100
    seed: int = 1234
    # "dense": the masked quadratic form; "block": the same function in linear memory
    # (train/blockwise.py), for long seq_len. chunk: tokens per chunk/tile of the block form.
    form: str = "dense"
    chunk: int = 256
    checkpoint: bool = False  # recompute each block's activations in backward
    # Form "block" only: recompute the learned sketch's MLP in backward, chunk by chunk
    # (PolySketchFormer.forward): less memory, slower steps.
    recompute_sketch: bool = False
    # Synthetic retrieval mix (docs/evaluation.md): each training sequence, with this
    # probability, becomes corpus filler with a random 5-digit key planted at a random depth and
    # the passkey question and answer at its end, in the format of `polysketch_eval passkey`.
    # 0 (the default) draws nothing extra from the data generator: batches are those of a run
    # without the key.
    retrieval_fraction: float = 0.0
    # Loss weight of the answer bytes of the retrieval sequences (the key and its ".\n"),
    # relative to 1 for every other byte; the loss is the weighted mean. Five key bytes in a
    # sequence of thousands carry almost no gradient at weight 1, so the copy that retrieval
    # needs is slow to appear; a larger weight makes it the task (docs/evaluation.md).
    retrieval_answer_weight: float = 1.0

    @staticmethod
    def from_json(obj: Dict[str, Any]) -> "TrainConfig":
        unknown = set(obj) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown train keys {sorted(unknown)}")
        tc = TrainConfig(**obj)
        tc.validate()
        return tc

    def validate(self) -> None:
        """ValueError naming the key for values that cannot train."""
        if self.form not in ("dense", "block"):
            raise ValueError(f"train.form must be 'dense' or 'block', got {self.form!r}")
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"train.chunk must be a positive integer, got {self.chunk!r}")
        if self.recompute_sketch and self.form != "block":
            raise ValueError(f"train.recompute_sketch needs train.form 'block', got "
                             f"{self.form!r}")
        if not 0.0 <= self.retrieval_fraction <= 1.0:
            raise ValueError(f"train.retrieval_fraction must be in [0, 1], got "
                             f"{self.retrieval_fraction}")
        if not self.retrieval_answer_weight > 0:
            raise ValueError(f"train.retrieval_answer_weight must be > 0, got "
                             f"{self.retrieval_answer_weight}")
        if self.retrieval_fraction > 0:
            need = retrieval.PROMPT_OVERHEAD_BYTES + retrieval.ANSWER_BYTES
            if self.seq_len + 1 <= need:
                raise ValueError(f"train.retrieval_fraction needs seq_len + 1 > {need} (the "
                                 f"needle, question and answer), got seq_len {self.seq_len}")


def load_run_config(path: Path):
    obj = json.loads(path.read_text())
    return ModelConfig.from_json(obj["model"]), TrainConfig.from_json(obj.get("train", {}))


def load_bytes(path: Path) -> np.ndarray:
    if not path.exists():
        sys.exit(f"train: {path} is missing; build it with train/corpus.py")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return tc.lr * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


class Batch(NamedTuple):
    x: torch.Tensor  # [B, seq_len] inputs
    y: torch.Tensor  # [B, seq_len] targets (x shifted by one)
    retrieval_rows: np.ndarray  # rows that are retrieval sequences (their answer ends y)


def sample_batch(data: np.ndarray, tc: TrainConfig, rng: np.random.Generator,
                 device: torch.device) -> Batch:
    starts = rng.integers(0, len(data) - tc.seq_len - 1, size=tc.batch_size)
    window = np.stack([data[s:s + tc.seq_len + 1] for s in starts]).astype(np.int64)
    rows = np.zeros(0, dtype=np.int64)
    if tc.retrieval_fraction > 0:  # no draw at 0: the batches stay those of a run without it
        rows = plant_retrieval(window, data, starts, tc.retrieval_fraction, rng)
    t = torch.from_numpy(window).to(device)
    return Batch(t[:, :-1], t[:, 1:], rows)


def batch_loss(logits: torch.Tensor, batch: Batch, tc: TrainConfig):
    """The training loss of a batch and, when it has retrieval rows, their key statistics.

    Loss: the mean cross-entropy over every target, where the answer bytes of retrieval rows
    weigh tc.retrieval_answer_weight (a weighted mean; at weight 1 the plain mean). Key stats
    (teacher-forced, over the KEY_DIGITS key bytes that open each answer): "key_bpb", their
    mean loss in bits, and "key_acc", the share of rows whose every key byte is the argmax."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.y.flatten(),
                                           reduction="none").view(batch.y.shape)
    stats: Dict[str, float] = {}
    rows = torch.from_numpy(batch.retrieval_rows).to(ce.device)
    if len(rows) == 0:
        return ce.mean(), stats
    answer = slice(ce.shape[1] - retrieval.ANSWER_BYTES, ce.shape[1])
    key = slice(answer.start, answer.start + retrieval.KEY_DIGITS)
    with torch.no_grad():
        stats["key_bpb"] = float(ce[rows, key].mean()) / LN2
        hit = logits[rows, key].argmax(-1) == batch.y[rows, key]
        stats["key_acc"] = float(hit.all(-1).float().mean())
    if tc.retrieval_answer_weight == 1.0:
        return ce.mean(), stats
    weights = torch.ones_like(ce)
    weights[rows, answer] = tc.retrieval_answer_weight
    return (ce * weights).sum() / weights.sum(), stats


def plant_retrieval(window: np.ndarray, data: np.ndarray, starts: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Turns each row of window [B, seq_len + 1] into a retrieval sequence with probability
    `fraction`: the corpus bytes from the row's start as filler, a random key planted after a
    uniform number of them, then the question and the answer (retrieval.build_training_sequence,
    the format the passkey eval asks). Returns the indices of the rows it changed."""
    rows = np.flatnonzero(rng.random(window.shape[0]) < fraction)
    num_filler = window.shape[1] - retrieval.PROMPT_OVERHEAD_BYTES - retrieval.ANSWER_BYTES
    for r in rows:
        key = retrieval.format_key(int(rng.integers(retrieval.KEY_MIN, retrieval.KEY_MAX + 1)))
        offset = int(rng.integers(0, num_filler + 1))
        filler = data[starts[r]:starts[r] + num_filler].tobytes()
        sequence = retrieval.build_training_sequence(filler, key, offset)
        window[r] = np.frombuffer(sequence, dtype=np.uint8)
    return rows


@torch.no_grad()
def evaluate(model: PolySketchFormer, data: np.ndarray, seq_len: int, windows: int,
             device: torch.device, form: str = "dense", chunk: int = 256) -> float:
    """Held-out bits per byte over `windows` evenly spaced, non-overlapping windows."""
    model.eval()
    n_win = min(windows, (len(data) - 1) // (seq_len + 1))
    if n_win < 1:
        raise ValueError(f"held-out split has {len(data)} bytes, fewer than seq_len + 1 = "
                         f"{seq_len + 1}")
    step = (len(data) - 1) // n_win
    total, count = 0.0, 0
    for w in range(n_win):
        window = torch.from_numpy(data[w * step:w * step + seq_len + 1].astype(np.int64))
        window = window.to(device)[None]
        logits = model(window[:, :-1], form=form, chunk=chunk)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 window[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += seq_len
    model.train()
    return total / count / LN2


def save_checkpoint(path: Path, model, opt, step: int, rng: np.random.Generator,
                    mc: ModelConfig, tc: TrainConfig, history) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "model_config": mc.to_json(), "train_config": asdict(tc), "history": history},
               tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a checkpoint


def same_model_but_context(source: Dict[str, Any], target: Dict[str, Any]) -> bool:
    """True when two model configs differ at most in max_seq_len, and the target's is not
    shorter: max_seq_len is the training context, which a fine-tune may extend."""
    if "max_seq_len" not in source or "max_seq_len" not in target:
        return source == target
    rest = {k: v for k, v in source.items() if k != "max_seq_len"}
    return (rest == {k: v for k, v in target.items() if k != "max_seq_len"}
            and target["max_seq_len"] >= source["max_seq_len"])


def load_init(path: Path, mc: ModelConfig,
              config_path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """--init: the weights of a run checkpoint (ckpt.pt) or of an exported model directory
    (config.json + model.safetensors), checked against this run's model config; exits naming
    the problem. Returns the state dict and where it came from, for the log."""
    if not path.exists():
        sys.exit(f"train: --init {path} does not exist")
    if path.is_dir():
        try:
            source_model = load_model_dir(path)
        except (OSError, ValueError) as e:
            sys.exit(f"train: --init {path}: {e}")
        source_config, weights = source_model.cfg.to_json(), source_model.state_dict()
        origin = "exported model directory"
    else:
        init = torch.load(path, map_location="cpu")
        if not isinstance(init, dict) or "model" not in init:
            sys.exit(f"train: --init {path} is neither a run checkpoint nor a model directory")
        source_config, weights = init.get("model_config"), init["model"]
        origin = f"step {init.get('step')} of its run"
    if not isinstance(source_config, dict) or not same_model_but_context(source_config,
                                                                         mc.to_json()):
        sys.exit(f"train: --init {path} was made with another model config than {config_path} "
                 "(only max_seq_len may differ, and only upward)")
    return weights, origin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="run config JSON")
    ap.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log)")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "data"
                    / "corpus", help="corpus directory with train.txt and heldout.txt")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--init", type=Path, default=None,
                    help="start a new run (no checkpoint in --out yet, or --fresh) from the "
                         "weights of this checkpoint, with a new optimizer and schedule: "
                         "fine-tuning. Its model config must equal --config's")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (with a checkpoint) after this step without changing the schedule; "
                         "a later run resumes as if never stopped")
    args = ap.parse_args()
    heap.keep_freed_memory()  # long sequences: reuse freed pages instead of faulting them anew

    mc, tc = load_run_config(args.config)
    if args.steps is not None:
        tc.steps = args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train: --device cuda but no CUDA device is available")
    device = torch.device("cuda" if use_cuda else "cpu")

    train_data = load_bytes(args.data / "train.txt")
    held_data = load_bytes(args.data / "heldout.txt")
    for name, arr in (("train.txt", train_data), ("heldout.txt", held_data)):
        if len(arr) < tc.seq_len + 2:
            sys.exit(f"train: {args.data / name} has {len(arr)} bytes; seq_len {tc.seq_len} "
                     "needs more")
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    model = PolySketchFormer(mc).to(device)
    opt = make_optimizer(model, tc)
    rng = np.random.default_rng(tc.seed)
    step, history = 0, []
    if ckpt_path.exists() and not args.fresh:
        ck = torch.load(ckpt_path, map_location=device)
        if ck["model_config"] != mc.to_json():
            sys.exit(f"train: {ckpt_path} was made with another model config; use --fresh")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history = ck["step"], ck["history"]
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
        if args.init is not None:
            print(f"--init {args.init} ignored: the run resumes from its own checkpoint",
                  flush=True)
    elif args.init is not None:
        weights, origin = load_init(args.init, mc, args.config)
        model.load_state_dict(weights)
        print(f"initialised from {args.init} ({origin})", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, device {device}, "
          f"threads {torch.get_num_threads()}, {len(train_data)} train bytes", flush=True)
    if tc.retrieval_fraction > 0:
        print(f"retrieval mix: {tc.retrieval_fraction:.1%} of sequences carry a passkey "
              f"(polysketch_eval/retrieval.py format)", flush=True)
    (args.out / "run_config.json").write_text(
        json.dumps({"model": mc.to_json(), "train": asdict(tc)}, indent=2) + "\n")

    model.train()
    log_path = args.out / "log.jsonl"
    kept = []  # a resumed run keeps the records up to its checkpoint; a fresh run starts anew
    if step and log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill
    log_path.write_text("".join(kept))
    log = open(log_path, "a")
    stop = tc.steps if args.stop_after is None else min(tc.steps, args.stop_after)
    t_last, tok_since = time.time(), 0
    t_start = time.time()
    key_window: List[float] = []
    while step < stop:
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sample_batch(train_data, tc, rng, device)
        logits = model(batch.x, form=tc.form, chunk=tc.chunk, checkpoint=tc.checkpoint,
                       recompute_sketch=tc.recompute_sketch)
        loss, key_stats = batch_loss(logits, batch, tc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        step += 1
        tok_since += batch.x.numel()
        record: Dict[str, Any] = {"step": step, "loss": float(loss), "lr": lr, "grad_norm": gnorm,
                                  **key_stats}
        if key_stats:
            key_window.append(key_stats["key_acc"])
        if step % 10 == 0 or step == tc.steps:
            now = time.time()
            record["tokens_per_s"] = tok_since / (now - t_last)
            keys = ""
            if key_window:  # teacher-forced key accuracy over the retrieval rows of the last steps
                keys = f" key acc {sum(key_window) / len(key_window):.2f}"
                key_window.clear()
            print(f"step {step:6d}/{tc.steps} loss {float(loss):.4f} "
                  f"({float(loss) / LN2:.3f} bpb) lr {lr:.2e} |g| {gnorm:.2f}{keys} "
                  f"{record['tokens_per_s']:.0f} tok/s elapsed {now - t_start:.0f}s", flush=True)
            t_last, tok_since = now, 0
        if step % tc.eval_every == 0 or step == tc.steps:
            bpb = evaluate(model, held_data, tc.seq_len, tc.eval_windows, device, tc.form,
                           tc.chunk)
            record["heldout_bpb"] = bpb
            history.append({"step": step, "heldout_bpb": bpb})
            print(f"eval step {step}: held-out {bpb:.4f} bits/byte", flush=True)
        log.write(json.dumps(record) + "\n")
        if step % tc.ckpt_every == 0 or step == stop:
            save_checkpoint(ckpt_path, model, opt, step, rng, mc, tc, history)
            log.flush()
    log.close()
    print(f"done: {step} steps, wall {time.time() - t_start:.0f}s this run", flush=True)


if __name__ == "__main__":
    main()
