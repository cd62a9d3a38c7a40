#!/usr/bin/python3
"""Builds the byte-level training corpus from the King James Bible of Debian package `bible-kjv`.

Each book is one document: its verses, one per line, without the verse references. Documents are
separated by a blank line. The held-out split is a fixed set of whole books (never shuffled lines),
spread over both testaments. Output: <out>/train.txt, <out>/heldout.txt, <out>/manifest.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

# Whole books kept out of training (names as the `bible` program abbreviates them).
HELDOUT_BOOKS = ("Ruth", "Eccl", "Lam", "Dan", "Mark", "Rom", "Heb", "1Pet", "Jude")
VERSE = re.compile(r"^([0-9]?[A-Za-z]+)([0-9]+):([0-9]+) (.*)$")


def read_bible() -> str:
    try:
        out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True,
                             capture_output=True)
    except FileNotFoundError:
        sys.exit("corpus: the `bible` program is missing; install Debian package bible-kjv "
                 "(scripts/setup-deps does)")
    return out.stdout.decode("utf-8")


def split_books(text: str) -> List[Tuple[str, List[str]]]:
    books: List[Tuple[str, List[str]]] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = VERSE.match(line)
        if not m:
            raise ValueError(f"line {line_no} is not a verse: {line[:60]!r}")
        book, verse = m.group(1), m.group(4).strip()
        if not books or books[-1][0] != book:
            books.append((book, []))
        books[-1][1].append(verse)
    return books


def build(out_dir: Path) -> Dict[str, object]:
    books = split_books(read_bible())
    names = [b for b, _ in books]
    missing = [b for b in HELDOUT_BOOKS if b not in names]
    if missing:
        raise ValueError(f"held-out books not found in the text: {missing}")
    train_docs = ["\n".join(v) + "\n" for b, v in books if b not in HELDOUT_BOOKS]
    held_docs = ["\n".join(v) + "\n" for b, v in books if b in HELDOUT_BOOKS]
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, object] = {"source": "bible-kjv: bible -f Gen1:1-Rev22:21",
                                   "heldout_books": list(HELDOUT_BOOKS),
                                   "num_books": len(books)}
    for split, docs in (("train", train_docs), ("heldout", held_docs)):
        data = "\n".join(docs).encode("utf-8")
        (out_dir / f"{split}.txt").write_bytes(data)
        manifest[f"{split}_bytes"] = len(data)
        manifest[f"{split}_sha256"] = hashlib.sha256(data).hexdigest()
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data"
                    / "corpus", help="output directory (default: data/corpus)")
    args = ap.parse_args()
    manifest = build(args.out)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
