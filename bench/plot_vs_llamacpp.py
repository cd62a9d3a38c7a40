"""Plots of bench/vs_llamacpp.py's JSON lines: decode and prefill tokens/s against context, one line
per system and weight format, at one thread count. Where a (system, format, context) cell was
measured more than once, the newest row is plotted. Rows whose status is not "ok" are left out.
  python3 bench/plot_vs_llamacpp.py bench/results/vs_llamacpp-long.jsonl --threads 1 \
      --out docs/img/vs_llamacpp.png [--since 2026-12-07T05:00Z]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FORMAT_ORDER = ("fp32", "16bit", "8bit")
STYLE = {"engine polysketch": "-", "engine softmax": "--", "llama.cpp": ":"}


def system(row: Dict[str, object]) -> str:
    if row["side"] == "engine":
        return "engine " + str(row["model"]).replace("gpt2-small-", "")
    return "llama.cpp"


def newest_cells(rows: Sequence[Dict[str, object]], threads: int,
                 since: str) -> Dict[Tuple[str, str, int], Dict[str, object]]:
    cells: Dict[Tuple[str, str, int], Dict[str, object]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("threads") != threads:
            continue
        if since and str(r.get("started", "")) < since:
            continue
        key = (system(r), str(r["format"]), int(r["context"]))  # type: ignore[call-overload]
        if key not in cells or str(r["started"]) >= str(cells[key]["started"]):
            cells[key] = r
    return cells


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--since", default="", help="only rows whose run started at or after this")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows: List[Dict[str, object]] = []
    for path in args.jsonl:
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    cells = newest_cells(rows, args.threads, args.since)
    if not cells:
        parser.error("no rows with status ok at that thread count")
    series: Dict[Tuple[str, str], List[Tuple[int, float, float]]] = {}
    for (sys_name, fmt, context), r in cells.items():
        series.setdefault((sys_name, fmt), []).append(
            (context, float(r["decode_tokens_per_s"]), float(r["prefill_tokens_per_s"])))  # type: ignore[arg-type]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"fp32": "tab:blue", "16bit": "tab:orange", "8bit": "tab:green"}
    for (sys_name, fmt), points in sorted(series.items(),
                                           key=lambda kv: (kv[0][0], FORMAT_ORDER.index(kv[0][1]))):
        points.sort()
        xs = [p[0] for p in points]
        for ax, index in ((axes[0], 1), (axes[1], 2)):
            ax.plot(xs, [p[index] for p in points], STYLE.get(sys_name, "-"), marker="o",
                    color=colors.get(fmt), label=f"{sys_name}, {fmt}")
    for ax, what in ((axes[0], "decode tokens/s (batch 1)"), (axes[1], "prefill tokens/s")):
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"GPT-2-small shape: engine vs llama.cpp, {args.threads} thread(s), CPU")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
