#!/usr/bin/python3
"""Generates text from a model directory with the recurrent decode (constant state for polysketch,
KV cache for the others): prefill the prompt in chunks, then one decode step per token.
Text is printed as it is produced, never splitting a UTF-8 character.
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modelio import load_model_dir  # noqa: E402


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           gen: torch.Generator) -> int:
    """One token from logits [V]. temperature 0 is greedy."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits.double() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # smallest set with mass >= top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[idx[keep]] = True
        probs = probs.masked_fill(~mask, 0.0)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, required=True, help="model directory")
    ap.add_argument("--prompt", default=None, help="prompt text")
    ap.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from a file")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 disables")
    ap.add_argument("--top-p", type=float, default=0.95, help="1 disables")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.prompt is None) == (args.prompt_file is None):
        sys.exit("generate: give exactly one of --prompt and --prompt-file")
    if args.max_tokens < 0 or not 0.0 < args.top_p <= 1.0 or args.top_k < 0 or args.chunk < 1:
        sys.exit("generate: need --max-tokens >= 0, 0 < --top-p <= 1, --top-k >= 0, --chunk >= 1")
    prompt = (args.prompt.encode("utf-8") if args.prompt is not None
              else args.prompt_file.read_bytes())
    if not prompt:
        sys.exit("generate: the prompt is empty (the byte models have no start token)")
    try:
        model = load_model_dir(args.model)
    except ValueError as e:
        sys.exit(f"generate: {e}")

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.tensor(list(prompt), dtype=torch.long)
    out = sys.stdout
    out.write(prompt.decode("utf-8", errors="replace"))
    out.flush()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with torch.no_grad():
        states = model.init_state(1)
        t0 = time.time()
        logits = model.prefill_chunked(tokens[None], states, args.chunk)[0, -1]
        t1 = time.time()
        pos = len(tokens)
        for _ in range(args.max_tokens):
            tok = sample(logits, args.temperature, args.top_k, args.top_p, gen)
            out.write(decoder.decode(bytes([tok])))
            out.flush()
            logits = model.decode_step(torch.tensor([tok]), states, pos)[0]
            pos += 1
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()
        t2 = time.time()
    print(f"[prompt {len(tokens)} tokens in {t1 - t0:.2f}s, {len(tokens) / max(t1 - t0, 1e-9):.0f} tok/s; "
          f"generated {args.max_tokens} tokens in {t2 - t1:.2f}s, "
          f"{args.max_tokens / max(t2 - t1, 1e-9):.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
