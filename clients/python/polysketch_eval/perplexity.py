"""Held-out bits per byte from prompt log-probabilities, by position bucket.

The windows and the two summary figures are those of train/eval.py (the PyTorch reference), so
the served model and the reference are compared number for number: the first
min(len(text), max_bytes) bytes, rounded down to a multiple of L, are cut into non-overlapping
windows of L bytes; each window runs from an empty state and every byte after the first is scored.
"all" averages every scored byte, "tail" the last L // 4 scored bytes of each window. Buckets
split the scored positions (a byte's index in its window) at 1k, 2k, 4k, 8k, ... (k = 1024).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence, Tuple

LN2 = math.log(2.0)
FIRST_BUCKET_END = 1024  # bucket edges: 0, 1024, 2048, 4096, 8192, ...


def windows(data: bytes, length: int, max_bytes: int) -> List[bytes]:
    """The windows train/eval.py scores; ValueError when not even one fits."""
    if length < 4:
        raise ValueError(f"window length {length} is below 4 (the last quarter must exist)")
    usable = (min(len(data), max_bytes) // length) * length
    if usable == 0:
        raise ValueError(f"the text ({len(data)} bytes, at most {max_bytes} used) is shorter than "
                         f"one window of {length} bytes")
    return [data[w:w + length] for w in range(0, usable, length)]


def bucket_edges(length: int) -> List[Tuple[int, int]]:
    """[lo, hi) position ranges: [0, 1k), [1k, 2k), [2k, 4k), ... with the last cut at `length`.
    Position p is a byte's index in its window; positions 1 .. length - 1 are scored."""
    edges: List[Tuple[int, int]] = []
    lo, hi = 0, FIRST_BUCKET_END
    while lo < length:
        edges.append((lo, min(hi, length)))
        lo, hi = hi, hi * 2
    return edges


def size_label(n: int) -> str:
    """A byte count as the flags take it: 4096 -> "4k", 1500 -> "1500" (exact, never rounded)."""
    if n % 1024 == 0 and n > 0:
        return f"{n // 1024}k"
    return str(n)


def bucket_label(lo: int, hi: int) -> str:
    return f"{size_label(lo)}-{size_label(hi)}"


@dataclasses.dataclass
class Accumulator:
    """Sums of negative log-likelihood (nats) over the windows of one length L."""

    length: int
    edges: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    total_nats: float = 0.0
    total_bytes: int = 0
    tail_nats: float = 0.0
    tail_bytes: int = 0
    bucket_nats: List[float] = dataclasses.field(default_factory=list)
    bucket_bytes: List[int] = dataclasses.field(default_factory=list)
    num_windows: int = 0

    def __post_init__(self) -> None:
        self.edges = bucket_edges(self.length)
        self.bucket_nats = [0.0] * len(self.edges)
        self.bucket_bytes = [0] * len(self.edges)

    def add_window(self, logprobs: Sequence[float]) -> None:
        """Adds one window: logprobs[i] is the natural-log probability of byte i + 1 given bytes
        0..i (what the server returns as prompt_logprobs), length - 1 entries."""
        if len(logprobs) != self.length - 1:
            raise ValueError(f"a window of {self.length} bytes has {self.length - 1} scored "
                             f"bytes, got {len(logprobs)} log-probabilities")
        nll = [-float(x) for x in logprobs]
        # A log-probability is <= 0; float32 rounding of a near-certain byte may give +1e-7.
        if not all(math.isfinite(x) and x >= -1e-3 for x in nll):
            raise ValueError("a log-probability is positive, infinite or NaN")
        self.total_nats += math.fsum(nll)
        self.total_bytes += len(nll)
        tail = nll[-(self.length // 4):]
        self.tail_nats += math.fsum(tail)
        self.tail_bytes += len(tail)
        for b, (lo, hi) in enumerate(self.edges):
            # Entry i scores position i + 1: positions [lo, hi) are entries [lo - 1, hi - 1).
            part = nll[max(lo - 1, 0):hi - 1]
            self.bucket_nats[b] += math.fsum(part)
            self.bucket_bytes[b] += len(part)
        self.num_windows += 1

    def bpb_all(self) -> float:
        return self.total_nats / self.total_bytes / LN2

    def bpb_tail(self) -> float:
        return self.tail_nats / self.tail_bytes / LN2

    def result(self) -> Dict[str, object]:
        """The JSON record of this length (see docs/evaluation.md)."""
        return {
            "length": self.length,
            "windows": self.num_windows,
            "scored_bytes": self.total_bytes,
            "bpb_all": self.bpb_all(),
            "bpb_tail": self.bpb_tail(),
            "tail_bytes": self.tail_bytes,
            "buckets": [
                {"lo": lo, "hi": hi, "label": bucket_label(lo, hi), "scored_bytes": n,
                 "bpb": (s / n / LN2) if n else None}
                for (lo, hi), s, n in zip(self.edges, self.bucket_nats, self.bucket_bytes)
            ],
        }


def markdown_table(results: Sequence[Dict[str, object]]) -> str:
    """One row per length: all, tail, then bits per byte of every bucket."""
    labels: List[str] = []
    for r in results:
        for b in r["buckets"]:  # type: ignore[union-attr]
            if b["label"] not in labels:
                labels.append(b["label"])
    header = ["length", "windows", "all", "tail"] + labels
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        by_label = {b["label"]: b["bpb"] for b in r["buckets"]}  # type: ignore[union-attr]
        cells = [str(r["length"]), str(r["windows"]), f"{r['bpb_all']:.4f}",
                 f"{r['bpb_tail']:.4f}"]
        cells += [f"{by_label[x]:.4f}" if by_label.get(x) is not None else "" for x in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
