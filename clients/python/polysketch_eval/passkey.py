"""Passkey retrieval: trials (filler, key, depth), answer scoring, the markdown table, the heat map.

A cell is (length L, depth d); each of its trials plants a random key at depth d of filler text
cut from the held-out split, so that the whole prompt is exactly L bytes (retrieval.py has the
format). Trials are a pure function of (seed, L, d, trial index): a rerun, or a run over other
cells, asks the same questions of the cells they share.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Sequence

from . import retrieval


@dataclasses.dataclass(frozen=True)
class Trial:
    length: int  # prompt bytes
    depth: float  # percent of the filler before the needle
    index: int  # trial number within the cell
    key: str
    filler_start: int  # where the filler was cut from the text
    offset: int  # filler bytes before the needle
    prompt: bytes


def check_cell(text_bytes: int, length: int, depth: float) -> None:
    """ValueError when (length, depth) cannot be asked of a text of `text_bytes` bytes."""
    num_filler = retrieval.filler_bytes(length)
    retrieval.depth_offset(depth, num_filler)
    if num_filler > text_bytes:
        raise ValueError(f"a passkey prompt of {length} bytes needs {num_filler} filler bytes; "
                         f"the text has {text_bytes}")


def make_trial(text: bytes, length: int, depth: float, index: int, seed: int) -> Trial:
    """Trial `index` of cell (length, depth): its key and filler window are drawn from a random
    generator seeded by (seed, length, depth, index)."""
    check_cell(len(text), length, depth)
    num_filler = retrieval.filler_bytes(length)
    # A string seed is hashed with SHA-512: the same on every run and machine.
    rng = random.Random(f"passkey:{seed}:{length}:{depth:g}:{index}")
    key = retrieval.format_key(rng.randint(retrieval.KEY_MIN, retrieval.KEY_MAX))
    start = rng.randrange(0, len(text) - num_filler + 1)
    offset = retrieval.depth_offset(depth, num_filler)
    prompt = retrieval.build_prompt(text[start:start + num_filler], key, offset)
    return Trial(length, depth, index, key, start, offset, prompt)


def score_answer(trial: Trial, generated: bytes) -> Dict[str, object]:
    """The JSON record of one trial: exact match of the first number in the answer."""
    extracted = retrieval.extract_key(generated)
    return {
        "index": trial.index,
        "key": trial.key,
        "filler_start": trial.filler_start,
        "offset": trial.offset,
        "answer": generated.decode("utf-8", errors="replace"),
        "extracted": extracted,
        "correct": extracted == trial.key,
    }


def cell_result(length: int, depth: float,
                answers: Sequence[Dict[str, object]]) -> Dict[str, object]:
    correct = sum(1 for a in answers if a["correct"])
    return {
        "length": length,
        "depth": depth,
        "trials": len(answers),
        "correct": correct,
        "accuracy": correct / len(answers) if answers else None,
        "answers": list(answers),
    }


def _grid(cells: Sequence[Dict[str, object]], lengths: Sequence[int],
          depths: Sequence[float]) -> List[List[Optional[float]]]:
    """accuracy[depth row][length column]; None where a cell is missing."""
    by_cell = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    return [[by_cell.get((n, d)) for n in lengths] for d in depths]  # type: ignore[misc]


def markdown_table(cells: Sequence[Dict[str, object]], lengths: Sequence[int],
                   depths: Sequence[float], size_label) -> str:
    """Rows: depth; columns: prompt length; entries: exact-match accuracy. A last row averages
    each length over its depths."""
    grid = _grid(cells, lengths, depths)
    header = ["depth \\ length"] + [size_label(n) for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d, row in zip(depths, grid):
        lines.append("| " + " | ".join([f"{d:g}%"] + [_fmt(x) for x in row]) + " |")
    means = []
    for j in range(len(lengths)):
        column = [row[j] for row in grid if row[j] is not None]
        means.append(sum(column) / len(column) if column else None)
    lines.append("| " + " | ".join(["mean"] + [_fmt(x) for x in means]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def heatmap_png(cells: Sequence[Dict[str, object]], lengths: Sequence[int],
                depths: Sequence[float], size_label, title: str, path: str) -> None:
    """Accuracy over (length, depth) as long-context papers draw it: length on x, depth on y
    (0% at the top), red (0) to green (1), each cell annotated. Needs matplotlib (Debian
    python3-matplotlib); ImportError names the package when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the heat map needs matplotlib: apt-get install python3-matplotlib "
                          "(scripts/setup-deps installs it)") from error
    grid = _grid(cells, lengths, depths)
    values = [[float("nan") if x is None else x for x in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [size_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("prompt length (bytes)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, x in enumerate(row):
            dark = x is not None and (x < 0.2 or x > 0.85)  # the ends of RdYlGn are dark
            ax.text(j, i, _fmt(x) or "-", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
