#!/usr/bin/python3
"""Samples text from model directories and measures how much of it is made of real words.

For each model, each prompt and each seed, generates --max-tokens bytes with the recurrent decode
(train/generate.py's sampler; default temperature 1, no top-k / top-p truncation: the model's own
distribution). The generated text (the prompt excluded) is split into words, maximal runs of ASCII
letters; a word is "known" when its lowercase form occurs as a word in the training split of the
corpus. The report gives, per model, the share of known words over all samples (and its spread
over samples), and the samples themselves.

  /usr/bin/python3 train/samples.py models/long-polysketch models/tiny-polysketch \
      --prompts "And God said" "Then answered Jesus" --seeds 0,1,2,3 --out samples.md
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import sample  # noqa: E402
from modelio import load_model_dir  # noqa: E402

WORD = re.compile(r"[A-Za-z]+")


def vocabulary(text: str) -> Set[str]:
    """The lowercase words of a text."""
    return {w.lower() for w in WORD.findall(text)}


def known_share(text: str, vocab: Set[str]) -> Tuple[int, int]:
    """(known words, all words) of a text against a vocabulary."""
    words = [w.lower() for w in WORD.findall(text)]
    return sum(w in vocab for w in words), len(words)


def generate(model, prompt: bytes, max_tokens: int, temperature: float, seed: int,
             chunk: int = 1024) -> bytes:
    """max_tokens bytes after the prompt, sampled with the recurrent decode."""
    gen = torch.Generator().manual_seed(seed)
    out = bytearray()
    with torch.no_grad():
        states = model.init_state(1)
        tokens = torch.tensor(list(prompt), dtype=torch.long)
        logits = model.prefill_chunked(tokens[None], states, chunk)[0, -1]
        pos = len(prompt)
        for _ in range(max_tokens):
            tok = sample(logits, temperature, 0, 1.0, gen)
            out.append(tok)
            logits = model.decode_step(torch.tensor([tok]), states, pos)[0]
            pos += 1
    return bytes(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="model directories")
    ap.add_argument("--corpus", type=Path,
                    default=Path(__file__).resolve().parent.parent / "data" / "corpus" / "train.txt",
                    help="text whose words count as known (train/corpus.py's training split)")
    ap.add_argument("--prompts", nargs="+", default=["And God said"])
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated sampling seeds")
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"samples: --seeds must be comma-separated integers, got {args.seeds!r}")
    if args.max_tokens < 1 or args.temperature < 0:
        sys.exit("samples: need --max-tokens >= 1 and --temperature >= 0")
    if any(not p for p in args.prompts):
        sys.exit("samples: a prompt is empty (the byte models have no start token)")
    if not args.corpus.is_file():
        sys.exit(f"samples: corpus {args.corpus} not found (run train/corpus.py)")
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = vocabulary(args.corpus.read_text(encoding="utf-8", errors="replace"))

    results: List[Dict] = []
    lines: List[str] = []
    summary = ["| model | samples | words | known words | share | min / max per sample |",
               "|---|---|---|---|---|---|"]
    for model_dir in args.models:
        try:
            model = load_model_dir(model_dir)
        except ValueError as e:
            sys.exit(f"samples: {e}")
        name = model_dir.name
        known = total = 0
        shares: List[float] = []
        lines += [f"### {name}", ""]
        for prompt in args.prompts:
            for seed in seeds:
                text = generate(model, prompt.encode("utf-8"), args.max_tokens,
                                args.temperature, seed).decode("utf-8", errors="replace")
                k, n = known_share(text, vocab)
                known, total = known + k, total + n
                shares.append(k / n if n else 0.0)
                results.append({"model": name, "prompt": prompt, "seed": seed, "text": text,
                                "known_words": k, "words": n})
                lines += [f"prompt {prompt!r}, seed {seed} ({k}/{n} known words):", "",
                          "> " + (prompt + text).replace("\n", "\n> "), ""]
                print(f"{name} seed {seed}: {k}/{n} known", file=sys.stderr, flush=True)
        share = known / total if total else 0.0
        summary.append(f"| {name} | {len(shares)} | {total} | {known} | {share:.1%} | "
                       f"{min(shares):.1%} / {max(shares):.1%} |")
    header = (f"Samples at temperature {args.temperature}, {args.max_tokens} bytes each, no top-k / "
              f"top-p; a word is a run of ASCII letters, known when it occurs in {args.corpus.name}.")
    report = "\n".join([header, "", *summary, "", *lines])
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps({"temperature": args.temperature,
                                         "max_tokens": args.max_tokens,
                                         "samples": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
