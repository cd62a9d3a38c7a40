#!/usr/bin/python3
"""Held-out bits per byte of model directories at several context lengths; writes a markdown table.

For context length L the first `--max-bytes` bytes of the held-out split (rounded down to a
multiple of L) are cut into non-overlapping windows of L bytes; each window is run from an empty
state and every byte after the first is scored. Two columns per L: all positions, and the last
quarter of each window (what long context buys). Windows run through the chunked prefill path
(block algorithm for polysketch, KV cache for the others), so memory stays bounded at any L.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Position buckets are those of the serving-path evaluation, so both tables read alike.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python"))
import heap  # noqa: E402
from modelio import load_model_dir  # noqa: E402
from polysketch_eval import perplexity as buckets  # noqa: E402

LN2 = math.log(2.0)


@torch.no_grad()
def window_losses(model, window: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-position negative log-likelihood (nats) of window[1:] given the bytes before."""
    logits = model.prefill_chunked(window[None, :-1], model.init_state(1), chunk)[0]
    return torch.nn.functional.cross_entropy(logits.double(), window[1:], reduction="none")


def evaluate(model, data: np.ndarray, L: int, max_bytes: int, chunk: int) -> Tuple[float, float]:
    usable = (min(len(data), max_bytes) // L) * L
    if usable == 0:
        raise ValueError(f"held-out split ({len(data)} bytes) is shorter than context {L}")
    total = tail = 0.0
    n_total = n_tail = 0
    for w in range(0, usable, L):
        window = torch.from_numpy(data[w:w + L].astype(np.int64))
        nll = window_losses(model, window, chunk)
        total += float(nll.sum())
        n_total += nll.numel()
        q = nll[-(L // 4):]
        tail += float(q.sum())
        n_tail += q.numel()
    return total / n_total / LN2, tail / n_tail / LN2


def by_position(model, data: np.ndarray, L: int, max_bytes: int, chunk: int) -> Dict[str, Any]:
    """Bits per byte by position bucket (0-1k, 1-2k, 2-4k, ...) over the windows of evaluate()."""
    acc = buckets.Accumulator(L)
    for w in buckets.windows(data.tobytes(), L, max_bytes):
        window = torch.tensor(list(w), dtype=torch.long)
        acc.add_window((-window_losses(model, window, chunk)).tolist())
    return acc.result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="model directories")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "data"
                    / "corpus" / "heldout.txt")
    ap.add_argument("--contexts", default="512,2048,8192", help="comma-separated lengths")
    ap.add_argument("--max-bytes", type=int, default=131072, help="held-out bytes per context")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--by-position", action="store_true",
                    help="instead: bits per byte by position bucket for each context length")
    ap.add_argument("--json", type=Path, default=None, help="with --by-position: write JSON")
    args = ap.parse_args()
    heap.keep_freed_memory()  # long windows: reuse freed pages (train/heap.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.exists():
        sys.exit(f"eval: {args.data} is missing; build it with train/corpus.py")
    data = np.frombuffer(args.data.read_bytes(), dtype=np.uint8)
    try:
        contexts = [int(x) for x in args.contexts.split(",")]
    except ValueError:
        sys.exit(f"eval: --contexts must be comma-separated integers, got {args.contexts!r}")
    if args.chunk < 1:
        sys.exit(f"eval: --chunk must be >= 1, got {args.chunk}")
    if any(L < 4 for L in contexts):
        sys.exit("eval: every context length must be >= 4 (the last quarter must exist)")

    if args.by_position:
        report: Dict[str, Any] = {}
        text = []
        for mdir in args.models:
            try:
                model = load_model_dir(mdir)
            except ValueError as e:
                sys.exit(f"eval: {e}")
            report[mdir.name] = []
            for L in contexts:
                t0 = time.time()
                try:
                    report[mdir.name].append(by_position(model, data, L, args.max_bytes,
                                                         args.chunk))
                except ValueError as e:
                    sys.exit(f"eval: {e}")
                r = report[mdir.name][-1]
                print(f"{mdir.name} L={L}: {r['bpb_all']:.4f} bpb over {r['windows']} windows "
                      f"[{time.time() - t0:.0f}s]", flush=True)
            text.append(f"{mdir.name}\n\n" + buckets.markdown_table(report[mdir.name]))
        print("\n".join(text))
        if args.out:
            args.out.write_text("\n".join(text))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return

    rows: List[Dict[str, str]] = []
    for mdir in args.models:
        try:
            model = load_model_dir(mdir)
        except ValueError as e:
            sys.exit(f"eval: {e}")
        kinds = sorted({layer.kind + ("+local_exact" if layer.local_exact else "")
                        + (f"({layer.sketch})" if layer.sketch else "")
                        for layer in model.cfg.layers})
        row = {"model": mdir.name, "attention": ", ".join(kinds)}
        for L in contexts:
            t0 = time.time()
            allpos, tail = evaluate(model, data, L, args.max_bytes, args.chunk)
            row[f"{L}"] = f"{allpos:.4f}"
            row[f"{L} tail"] = f"{tail:.4f}"
            print(f"{mdir.name} L={L}: {allpos:.4f} bpb (last quarter {tail:.4f}) "
                  f"[{time.time() - t0:.0f}s]", flush=True)
        rows.append(row)

    cols = ["model", "attention"] + [c for L in contexts for c in (f"{L}", f"{L} tail")]
    header = ["model", "attention"] + [c if "tail" in c else f"{c} all" for c in cols[2:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
