"""The corpus builder (train/corpus.py): parsing the `bible` program's output into books, the
whole-book held-out split, the manifest, and (where `bible` is installed) the real corpus."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import corpus

# Training books around the held-out ones, in canonical order (names as `bible` abbreviates them).
TRAIN_BOOKS = ("Ge", "Exo", "Jdgs", "1Sm", "Isa", "Jonah", "Mat", "Acts", "1Cor", "2Pet", "Rev")
ORDER = ("Ge", "Exo", "Jdgs", "Ruth", "1Sm", "Eccl", "Isa", "Lam", "Dan", "Jonah", "Mat", "Mark",
         "Acts", "Rom", "1Cor", "Heb", "1Pet", "2Pet", "Jude", "Rev")
# Verses that occur verbatim in a held-out and in a training book of the Debian bible-kjv text,
# measured: 5 (Mark 14:26 = Mat 26:30, Mark 2:20 ~ Luke 5:35, Mark 13:6 = Mat 24:5,
# Mark 13:31 = Mat 24:35, and the benediction "The grace of our Lord Jesus Christ be with you
# all. Amen." of Rom 16:24 and Rev 22:21). Any more would mean held-out text leaked into training.
MAX_SHARED_VERSES = 5


def synthetic_books() -> List[Tuple[str, List[str]]]:
    """Every book of ORDER with 1-3 chapters of verses whose text names the book, so no verse of
    one book occurs in another."""
    books = []
    for i, name in enumerate(ORDER):
        verses = [f"Verse {c}:{v} of the book {name}, which says {'amen ' * ((i + v) % 4)}so."
                  for c in range(1, 2 + i % 3) for v in range(1, 4)]
        books.append((name, verses))
    return books


def bible_text(books: List[Tuple[str, List[str]]]) -> str:
    """The books in the `bible -f` output format: '<Book><chapter>:<verse> <text>' per line."""
    lines = []
    for name, verses in books:
        for k, text in enumerate(verses):
            lines.append(f"{name}{k // 3 + 1}:{k % 3 + 1} {text}")
    return "\n".join(lines) + "\n"


def document(verses: List[str]) -> str:
    return "\n".join(verses) + "\n"


# ------------------------------------------------------------------------------------------------
# split_books
# ------------------------------------------------------------------------------------------------
def test_split_books_by_book_without_references() -> None:
    text = ("Ge1:1 In the beginning God created the heaven and the earth.\n"
            "Ge1:2 And the earth was without form, and void.  \n"
            "\n"
            "Exo1:1 Now these are the names of the children of Israel.\n"
            "1Sm1:1 Now there was a certain man of Ramathaimzophim.\n"
            "1Sm12:25 But if ye shall still do wickedly, ye shall be consumed.\n")
    assert corpus.split_books(text) == [
        ("Ge", ["In the beginning God created the heaven and the earth.",
                "And the earth was without form, and void."]),
        ("Exo", ["Now these are the names of the children of Israel."]),
        ("1Sm", ["Now there was a certain man of Ramathaimzophim.",
                 "But if ye shall still do wickedly, ye shall be consumed."]),
    ]


@pytest.mark.parametrize("bad", ["not a verse at all", "Ge1 no verse number", "Ge1:1",
                                 "12Sm1:1 two-digit prefix"])
def test_split_books_refuses_malformed_line(bad: str) -> None:
    text = f"Ge1:1 In the beginning.\n\nGe1:2 And the earth.\n{bad}\nGe1:3 And God said.\n"
    with pytest.raises(ValueError, match=r"\bline 4\b"):
        corpus.split_books(text)


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------
def build_from(text: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, object]:
    monkeypatch.setattr(corpus, "read_bible", lambda: text)
    return corpus.build(out)


def test_build_holds_out_whole_books(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(corpus.HELDOUT_BOOKS) < set(ORDER) and set(TRAIN_BOOKS) < set(ORDER)
    books = synthetic_books()
    manifest = build_from(bible_text(books), tmp_path / "corpus", monkeypatch)
    held = (tmp_path / "corpus" / "heldout.txt").read_text()
    train = (tmp_path / "corpus" / "train.txt").read_text()

    # Documents: one per book in text order, separated by one blank line.
    want_held = [document(v) for b, v in books if b in corpus.HELDOUT_BOOKS]
    want_train = [document(v) for b, v in books if b not in corpus.HELDOUT_BOOKS]
    assert len(want_held) == len(corpus.HELDOUT_BOOKS)
    assert held == "\n".join(want_held)
    assert train == "\n".join(want_train)
    held_verses = {v for b, vs in books if b in corpus.HELDOUT_BOOKS for v in vs}
    assert not held_verses & set(train.splitlines())
    assert not any(":" in line.split(" ")[0] for line in held.splitlines() + train.splitlines())

    on_disk = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["num_books"] == len(ORDER)
    assert manifest["heldout_books"] == list(corpus.HELDOUT_BOOKS)
    for split in ("train", "heldout"):
        data = (tmp_path / "corpus" / f"{split}.txt").read_bytes()
        assert manifest[f"{split}_bytes"] == len(data)
        assert manifest[f"{split}_sha256"] == hashlib.sha256(data).hexdigest()


def test_build_refuses_text_without_a_heldout_book(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    books = [(b, v) for b, v in synthetic_books() if b != "Lam"]
    with pytest.raises(ValueError, match="Lam"):
        build_from(bible_text(books), tmp_path / "corpus", monkeypatch)


@pytest.mark.skipif(shutil.which("bible") is None, reason="the `bible` program (bible-kjv) is "
                    "not installed")
def test_real_corpus(tmp_path: Path) -> None:
    books = corpus.split_books(corpus.read_bible())
    assert len(books) == 66
    names = [b for b, _ in books]
    assert len(set(names)) == 66, "a book name occurs in two runs of lines"
    for name in corpus.HELDOUT_BOOKS:
        assert name in names

    manifest = corpus.build(tmp_path)
    assert manifest["num_books"] == 66
    held_lines = (tmp_path / "heldout.txt").read_text().split("\n")
    train_lines = (tmp_path / "train.txt").read_text().split("\n")
    # Nine documents of whole books: the blank separators are the only empty lines.
    assert held_lines.count("") == len(corpus.HELDOUT_BOOKS)  # 8 separators + the final newline
    shared = {v for v in held_lines if len(v) > 40} & {v for v in train_lines if len(v) > 40}
    assert len(shared) <= MAX_SHARED_VERSES, sorted(shared)
