"""Plots of polysketch-bench CSVs (bench/run_all.sh): decode step time and prefill time against
context length, and attention memory per request. Usage: plot.py RESULTS_DIR IMAGE_DIR"""
import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(results: Path):
    rows = []
    for path in sorted(results.glob("*.csv")):
        with path.open() as f:
            rows.extend(csv.DictReader(f))
    return rows


def main() -> None:
    results, images = Path(sys.argv[1]), Path(sys.argv[2])
    images.mkdir(parents=True, exist_ok=True)
    rows = load(results)
    models = sorted({r["model"].rstrip("/").split("/")[-1] for r in rows})
    by = defaultdict(list)
    for r in rows:
        by[(r["model"].rstrip("/").split("/")[-1], int(r["batch"]))].append(r)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, batch), rs in sorted(by.items()):
        rs.sort(key=lambda r: int(r["context"]))
        ax.plot([int(r["context"]) for r in rs], [float(r["step_ms"]) for r in rs], marker="o",
                label=f"{model}, batch {batch}")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode step (ms)",
           title="Decode step time vs context (CPU engine)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(images / "decode_vs_context.png", dpi=110)

    for name, column, ylabel, title in [
        ("prefill_vs_length.png", "prefill_s", "prefill time (s)", "Prefill time vs prompt length"),
        ("memory_vs_context.png", "attention_bytes_per_request", "attention bytes per request",
         "Attention memory per request vs context"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in models:
            rs = {int(r["context"]): float(r[column]) for (m, _), v in by.items() if m == model
                  for r in v}
            xs = sorted(rs)
            ax.plot(xs, [rs[x] for x in xs], marker="o", label=model)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(images / name, dpi=110)
    print(f"plots written to {images}")


if __name__ == "__main__":
    main()
