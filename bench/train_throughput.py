#!/usr/bin/python3
"""Training throughput and peak memory by sequence length, every attention variant side by side.

One cell = (shape, variant, n): a model of that shape is built, and training steps (forward,
backward, AdamW step) on random byte sequences of n tokens are timed. Each cell runs in a child
process, so its peak resident memory (ru_maxrss) is its own; the memory column is that peak minus
the child's resident size before the first step (weights, optimizer state and the interpreter).
Variants (every one through the linear-memory training forms of train/blockwise.py):
  polysketch-learned-local  learned sketch r 32 + exact local blocks of 128 (the shipped design)
  polysketch-random         random sketch r 32, no local block
  softmax-tiled             exact softmax, FlashAttention's algorithm (online softmax, recompute)
  polynomial-tiled          exact degree-4 polynomial attention, tiled the same way
Shapes: tiny (width 192, 4 layers, 3 heads; the shipped models) and gpt2-small (width 768,
12 layers, 12 heads, FFN 2048 gated: 85M weights outside the byte embedding).

Each cell keeps freed memory in its process (train/heap.py, as train.py does; --heap glibc-default
measures without it): with glibc's defaults every large tensor is page-faulted anew each step and
long sequences pay for it per token.

Cells already in --results are skipped (a long sweep resumes where it stopped); --report turns the
results into a markdown table (tokens/s, peak memory, ratio to softmax-tiled) and a PNG plot.

  bench/train_throughput.py --shapes tiny --results bench/results/train_throughput.jsonl
  bench/train_throughput.py --report bench/results/train_throughput.jsonl \
      --table docs/train_throughput.md --plot docs/img/train_throughput.png
  bench/train_throughput.py --report bench/results/train_throughput.jsonl --shapes gpt2-small \
      --measure cpu --table docs/train_throughput_gpt2-small.md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
SHAPES: Dict[str, Dict[str, int]] = {
    "tiny": {"d_model": 192, "n_layers": 4, "n_heads": 3},
    "gpt2-small": {"d_model": 768, "n_layers": 12, "n_heads": 12},
}
VARIANTS: Dict[str, Dict[str, Any]] = {
    "polysketch-learned-local": {"kind": "polysketch", "sketch": "learned", "sketch_size": 32,
                                 "local_exact": True, "block_size": 128},
    "polysketch-random": {"kind": "polysketch", "sketch": "random", "sketch_size": 32},
    "softmax-tiled": {"kind": "softmax"},
    "polynomial-tiled": {"kind": "polynomial"},
}
BASELINE = "softmax-tiled"
RECOMPUTED = " (sketch recomputed)"
ROWS = [v + mark for v in VARIANTS for mark in ("", RECOMPUTED)]  # table rows, in order


def run_cell(shape: str, variant: str, n: int, batch: int, steps: int, warmup: int, chunk: int,
             threads: int, heap_mode: str, recompute_sketch: bool) -> Dict[str, Any]:
    """Runs in the child: builds the model, times `steps` training steps after `warmup`."""
    import torch
    sys.path.insert(0, str(ROOT / "train"))
    import heap
    from model import ModelConfig, PolySketchFormer

    kept = heap.keep_freed_memory() if heap_mode == "kept" else False

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_json({"architecture": "polysketchformer", "vocab_size": 256,
                                 "max_seq_len": n, "position_encoding": "rope",
                                 "attention": VARIANTS[variant], **SHAPES[shape]})
    model = PolySketchFormer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step() -> Tuple[float, float]:
        tokens = torch.randint(0, 256, (batch, n + 1), generator=gen)
        c0 = time.process_time()
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1], form="block", chunk=chunk, checkpoint=True,
                       recompute_sketch=recompute_sketch)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(warmup):
        step()
    timed = [step() for _ in range(steps)]
    times = [t for t, _ in timed]
    cpu = [c for _, c in timed]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"shape": shape, "variant": variant, "n": n, "batch": batch, "chunk": chunk,
            "threads": threads, "warmup": warmup, "steps": steps, "step_seconds": times,
            "tokens_per_s": batch * n * steps / sum(times),
            # CPU seconds of the process (every thread): on a shared machine, where other jobs
            # take cores away, tokens per CPU-second still measures the work a step needs.
            "step_cpu_seconds": cpu, "tokens_per_cpu_s": batch * n * steps / sum(cpu),
            "params": sum(p.numel() for p in model.parameters()),
            "heap": "kept" if kept else "glibc-default", "recompute_sketch": recompute_sketch,
            "peak_rss_bytes": peak, "activation_peak_bytes": peak - rss_before,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg()}


def key(r: Dict[str, Any]):
    # Records from before the heap setting was recorded ran with glibc's defaults.
    return (r["shape"], row_name(r), r["n"], r["batch"], r["threads"],
            r.get("heap", "glibc-default"))


def row_name(r: Dict[str, Any]) -> str:
    """The table row of a record: its variant, marked when the learned sketch was recomputed."""
    return r["variant"] + (RECOMPUTED if r.get("recompute_sketch") else "")


def sweep(args: argparse.Namespace) -> None:
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {key(json.loads(line)) for line in results.read_text().splitlines() if line}
    for shape in args.shapes.split(","):
        for n in [int(x) for x in args.lengths.split(",")]:
            for variant in args.variants.split(","):
                batch = max(1, args.tokens_per_step // n)
                cell = {"shape": shape, "variant": variant, "n": n, "batch": batch,
                        "threads": args.threads, "heap": args.heap,
                        "recompute_sketch": args.recompute_sketch}
                if key(cell) in done:
                    print(f"{shape} {variant} n={n}: already in {results}", flush=True)
                    continue
                t0 = time.time()
                cmd = [sys.executable, __file__, "--cell", shape, variant, str(n), str(batch),
                       str(args.steps), str(args.warmup), str(args.chunk), str(args.threads),
                       args.heap, "1" if args.recompute_sketch else "0"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{shape} {variant} n={n}: FAILED (exit {proc.returncode})\n"
                          f"{proc.stderr[-2000:]}", flush=True)
                    continue
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
                with open(results, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{shape} {variant} n={n} batch={batch}: {rec['tokens_per_s']:.0f} tok/s, "
                      f"{rec['tokens_per_cpu_s']:.0f} tok/CPU-s, "
                      f"activation peak {rec['activation_peak_bytes'] / 2**20:.0f} MiB "
                      f"[{time.time() - t0:.0f}s]", flush=True)


def report(args: argparse.Namespace) -> None:
    recs = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line]
    wanted = args.shapes.split(",")
    recs = [r for r in recs if r["shape"] in wanted and r.get("heap", "glibc-default") == args.heap]
    if not recs:
        sys.exit(f"train_throughput: no results for shapes {wanted} with --heap {args.heap} in "
                 f"{args.report}")
    measure = "tokens_per_s" if args.measure == "wall" else "tokens_per_cpu_s"
    unit = "tokens/s" if args.measure == "wall" else "tokens per CPU-second"
    missing = [key(r) for r in recs if measure not in r]
    if missing:
        sys.exit(f"train_throughput: {len(missing)} results lack {measure} (measured before it "
                 f"was recorded), e.g. {missing[0]}; rerun those cells or use --measure wall")
    lines: List[str] = []
    for shape in [s for s in SHAPES if any(r["shape"] == s for r in recs)]:
        rows = [r for r in recs if r["shape"] == shape]
        ns = sorted({r["n"] for r in rows})
        variants = [v for v in ROWS if any(row_name(r) == v for r in rows)]
        by = {(row_name(r), r["n"]): r for r in rows}
        lines += [f"### {shape} ({rows[0]['params'] / 1e6:.1f}M parameters with a polysketch "
                  f"layer stack; {unit}, activation peak in MiB; heap {args.heap})", "",
                  "| variant | " + " | ".join(f"{n // 1024}k" if n >= 1024 else str(n)
                                              for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for v in variants:
            cells = []
            for n in ns:
                r = by.get((v, n))
                cells.append("-" if r is None else
                             f"{r[measure]:.0f} ({r['activation_peak_bytes'] / 2**20:.0f})")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        for v in variants:
            if v == BASELINE:
                continue
            cells = []
            for n in ns:
                r, b = by.get((v, n)), by.get((BASELINE, n))
                cells.append("-" if r is None or b is None else
                             f"{r[measure] / b[measure]:.2f}x")
            lines.append(f"| {v} / {BASELINE} | " + " | ".join(cells) + " |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        shapes = [s for s in SHAPES if any(r["shape"] == s for r in recs)]
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            for v in ROWS:
                pts = sorted((r["n"], r[measure]) for r in recs
                             if r["shape"] == shape and row_name(r) == v)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens per sequence")
            ax.set_ylabel(f"training {unit} (fwd + bwd + AdamW)")
            ax.set_title(f"{shape}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny",
                    help=f"comma-separated, of {list(SHAPES)} (with --report: the shapes tabulated)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--tokens-per-step", type=int, default=0,
                    help="batch = max(1, this / n); 0: batch 1 at every length")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per cell")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per cell first")
    ap.add_argument("--chunk", type=int, default=512, help="chunk / tile length")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" /
                                             "train_throughput.jsonl"))
    ap.add_argument("--report", help="results file to tabulate instead of measuring")
    ap.add_argument("--table", help="with --report: write the markdown table here")
    ap.add_argument("--plot", help="with --report: write the PNG plot here")
    ap.add_argument("--measure", choices=["wall", "cpu"], default="wall",
                    help="with --report: tokens per wall second, or per CPU-second of the cell's "
                         "process (steadier on a shared machine; with --threads 1 the two agree "
                         "on an idle one)")
    ap.add_argument("--heap", choices=["kept", "glibc-default"], default="kept",
                    help="kept: freed memory stays in the process (train/heap.py, what train.py "
                         "does); glibc-default: large tensors are mmapped and page-faulted anew "
                         "every step. --report tabulates the records of this setting only")
    ap.add_argument("--recompute-sketch", action="store_true",
                    help="recompute the learned sketch's MLP in backward too (less memory, slower; "
                         "PolySketchFormer.forward); its rows are marked " + repr(RECOMPUTED))
    ap.add_argument("--cell", nargs=10, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        shape, variant, n, batch, steps, warmup, chunk, threads, heap_mode, recompute = args.cell
        print(json.dumps(run_cell(shape, variant, int(n), int(batch), int(steps), int(warmup),
                                  int(chunk), int(threads), heap_mode, recompute == "1")))
        return
    if args.report:
        report(args)
        return
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            sys.exit(f"train_throughput: unknown shape {shape!r}; one of {list(SHAPES)}")
    for v in args.variants.split(","):
        if v not in VARIANTS:
            sys.exit(f"train_throughput: unknown variant {v!r}; one of {list(VARIANTS)}")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        sys.exit(f"train_throughput: --lengths must be integers, got {args.lengths!r}")
    if min(lengths) < 1 or args.steps < 1 or args.warmup < 0 or args.chunk < 1:
        sys.exit("train_throughput: lengths, --steps and --chunk must be >= 1, --warmup >= 0")
    sweep(args)


if __name__ == "__main__":
    main()
