"""Command line: python3 -m polysketch_eval {perplexity,passkey} ... (docs/evaluation.md).

perplexity  held-out bits per byte by position bucket, from prompt log-probabilities
passkey     exact-match retrieval of a 5-digit key planted at a depth of filler text

Progress goes to stderr, the result table to stdout, the full result to --out (JSON).
Exit codes: 0 ok; 1 the run failed (server unreachable, RPC error); 2 bad arguments, including
lengths the server does not accept.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import passkey, perplexity, retrieval
from .backend import Backend, EvalError, ServerInfo

PROG = "python3 -m polysketch_eval"
DEFAULT_DATA = os.path.join("data", "corpus", "heldout.txt")  # train/corpus.py's held-out split
DEFAULT_PPL_LENGTHS = "512,2k,8k"  # those of train/eval.py's default
DEFAULT_PASSKEY_LENGTHS = "1k,4k,8k,16k,32k,64k"
DEFAULT_DEPTHS = "10,30,50,70,90"
JSON_VERSION = 1

Log = Callable[[str], None]


class UsageError(Exception):
    """Arguments that cannot run: exit status 2 with the message."""


def parse_lengths(text: str, flag: str) -> List[int]:
    """'512,4k' -> [512, 4096] (k = 1024); UsageError names the flag and the bad entry."""
    lengths: List[int] = []
    for item in text.split(","):
        s = item.strip().lower()
        scale = 1024 if s.endswith("k") else 1
        digits = s[:-1] if scale > 1 else s
        if not digits.isdigit() or int(digits) == 0:
            raise UsageError(f"{flag}: {item.strip()!r} is not a length (a positive number of "
                             "bytes, or with k: 4k = 4096)")
        n = int(digits) * scale
        if n in lengths:
            raise UsageError(f"{flag}: length {n} is given twice")
        lengths.append(n)
    return lengths


def parse_depths(text: str) -> List[float]:
    depths: List[float] = []
    for item in text.split(","):
        try:
            d = float(item.strip().rstrip("%"))
        except ValueError:
            raise UsageError(f"--depths: {item.strip()!r} is not a number") from None
        if not 0.0 < d < 100.0:
            raise UsageError(f"--depths: {d:g} is outside (0, 100): a depth is the percent of "
                             "the filler before the key")
        if d in depths:
            raise UsageError(f"--depths: depth {d:g} is given twice")
        depths.append(d)
    return depths


def read_text(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        hint = (" (build it from the repository root with /usr/bin/python3 train/corpus.py)"
                if path == DEFAULT_DATA else "")
        raise UsageError(f"--data {path} is missing{hint}")
    data = p.read_bytes()
    if not data:
        raise UsageError(f"--data {path} is empty")
    return data


def check_server(info: ServerInfo, lengths: Sequence[int], new_tokens: int) -> None:
    """UsageError naming every length the server would refuse (prompt limit, context limit,
    max_new_tokens limit) and a tokenizer other than bytes."""
    if info.tokenizer != "bytes":
        raise UsageError(f"the server's tokenizer is {info.tokenizer!r}; the eval tool measures "
                         "byte-level models (tokenizer \"bytes\")")
    problems = []
    if new_tokens > info.max_new_tokens > 0:
        problems.append(f"--max_new_tokens {new_tokens} is above the server's limit "
                        f"{info.max_new_tokens}")
    for n in lengths:
        if n > info.max_prompt_tokens:
            problems.append(f"length {n} is above the server's max_prompt_tokens "
                            f"{info.max_prompt_tokens}")
        elif info.max_context and n + new_tokens > info.max_context:
            problems.append(f"length {n} + {new_tokens} new tokens is above the server's "
                            f"max_context {info.max_context}")
    if problems:
        raise UsageError("; ".join(problems) + " (GetModelInfo limits; the server's "
                         "--max_context / --max_prompt_tokens flags set them)")


def data_record(path: str, data: bytes) -> Dict[str, object]:
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json(path: str, obj: Dict[str, object]) -> None:
    """Writes atomically: a killed run never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The two evaluations, over any Backend.
# ------------------------------------------------------------------------------------------------
def run_perplexity(backend: Backend, data: bytes, lengths: Sequence[int], max_bytes: int,
                   log: Log) -> List[Dict[str, object]]:
    """One result record per length (perplexity.Accumulator.result)."""
    results = []
    t0 = time.monotonic()
    for n in lengths:
        acc = perplexity.Accumulator(n)
        cut = perplexity.windows(data, n, max_bytes)
        for i, window in enumerate(cut):
            acc.add_window(backend.prompt_logprobs(list(window)))
            log(f"perplexity L={perplexity.size_label(n)}: window {i + 1}/{len(cut)}, running "
                f"{acc.bpb_all():.4f} bpb (tail {acc.bpb_tail():.4f}), "
                f"elapsed {time.monotonic() - t0:.0f}s")
        results.append(acc.result())
    return results


def run_passkey(backend: Backend, text: bytes, lengths: Sequence[int], depths: Sequence[float],
                keys: int, seed: int, max_new_tokens: int, log: Log) -> List[Dict[str, object]]:
    """One cell record per (length, depth), lengths outermost (passkey.cell_result)."""
    cells = []
    t0 = time.monotonic()
    correct = asked = 0
    for n in lengths:
        for d in depths:
            answers = []
            for i in range(keys):
                trial = passkey.make_trial(text, n, d, i, seed)
                answers.append(passkey.score_answer(trial, backend.greedy(list(trial.prompt),
                                                                          max_new_tokens)))
                correct += bool(answers[-1]["correct"])
                asked += 1
            cell = passkey.cell_result(n, d, answers)
            cells.append(cell)
            log(f"passkey L={perplexity.size_label(n)} depth={d:g}%: {cell['correct']}/{keys} "
                f"correct; all cells so far {correct}/{asked} = {correct / asked:.3f}, "
                f"elapsed {time.monotonic() - t0:.0f}s")
    return cells


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:50051", help="server host:port")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="deadline of each request in seconds (default 600)")
    p.add_argument("--connect_timeout", type=float, default=10.0,
                   help="deadline of the first call (GetModelInfo) in seconds (default 10)")
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    p.add_argument("--tls_ca", default=None, help="PEM CA bundle of the server (implies TLS)")
    p.add_argument("--tls_cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls_key", default=None, help="PEM private key of --tls_cert")
    p.add_argument("--server_name", default=None, help="name to check the certificate against")
    p.add_argument("--token_file", default=None, help="file whose first line is a bearer token")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("perplexity", help="held-out bits per byte by position bucket")
    q.add_argument("--data", default=DEFAULT_DATA, help=f"text file (default {DEFAULT_DATA})")
    q.add_argument("--lengths", default=DEFAULT_PPL_LENGTHS,
                   help=f"window lengths in bytes, k = 1024 (default {DEFAULT_PPL_LENGTHS})")
    q.add_argument("--max_bytes", type=int, default=131072,
                   help="text bytes cut into windows per length (default 131072, as train/eval.py)")
    q.add_argument("--out", default=None, help="write the JSON result here")
    q.add_argument("--table", default=None, help="also write the markdown table here")

    k = sub.add_parser("passkey", help="passkey retrieval accuracy by length and depth")
    k.add_argument("--data", default=DEFAULT_DATA,
                   help=f"filler text file (default {DEFAULT_DATA})")
    k.add_argument("--lengths", default=DEFAULT_PASSKEY_LENGTHS,
                   help=f"prompt lengths in bytes, k = 1024 (default {DEFAULT_PASSKEY_LENGTHS})")
    k.add_argument("--depths", default=DEFAULT_DEPTHS,
                   help=f"key depths in percent, each in (0, 100) (default {DEFAULT_DEPTHS})")
    k.add_argument("--keys", type=int, default=20, help="keys per cell (default 20)")
    k.add_argument("--seed", type=int, default=0, help="seed of the keys and filler windows")
    k.add_argument("--max_new_tokens", type=int, default=8,
                   help="greedy answer length in tokens (default 8)")
    k.add_argument("--out", default=None, help="write the JSON result here")
    k.add_argument("--table", default=None, help="also write the markdown table here")
    k.add_argument("--plot", default=None, help="write the heat map (PNG) here")
    return p


def _validate(args: argparse.Namespace) -> None:
    """The checks that need no server and no file."""
    if not args.timeout > 0 or not args.connect_timeout > 0:
        raise UsageError("--timeout and --connect_timeout must be > 0 seconds")
    for flag in ("out", "table", "plot"):
        path = getattr(args, flag, None)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"--{flag} {path}: its directory does not exist")
    if args.command == "perplexity":
        args.lengths = parse_lengths(args.lengths, "--lengths")
        if args.max_bytes < 1:
            raise UsageError(f"--max_bytes must be >= 1, got {args.max_bytes}")
        small = [n for n in args.lengths if n < 4]
        if small:
            raise UsageError(f"--lengths: {small[0]} is below 4 (the last quarter must exist)")
        too_long = [n for n in args.lengths if n > args.max_bytes]
        if too_long:
            raise UsageError(f"--lengths: {too_long[0]} is above --max_bytes {args.max_bytes}: "
                             "not one window fits")
    else:
        args.lengths = parse_lengths(args.lengths, "--lengths")
        args.depths = parse_depths(args.depths)
        if args.keys < 1:
            raise UsageError(f"--keys must be >= 1, got {args.keys}")
        if args.max_new_tokens < retrieval.KEY_DIGITS:
            raise UsageError(f"--max_new_tokens must be >= {retrieval.KEY_DIGITS} (the "
                             f"key's digits), got {args.max_new_tokens}")
        for n in args.lengths:
            try:
                retrieval.filler_bytes(n)
            except ValueError as error:
                raise UsageError(f"--lengths: {error}") from None
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: apt-get install python3-matplotlib "
                             "(scripts/setup-deps installs it)")


def _run(args: argparse.Namespace, backend: Backend, log: Log) -> Dict[str, object]:
    data = read_text(args.data)
    if args.command == "perplexity":
        for n in args.lengths:  # every length before the first request, not after an hour
            try:
                perplexity.windows(data, n, args.max_bytes)
            except ValueError as error:
                raise UsageError(f"--data {args.data}: {error}") from None
        backend.require_prompt_logprobs()
        info = backend.info()
        check_server(info, args.lengths, 0)
    else:
        for n in args.lengths:
            for d in args.depths:
                try:
                    passkey.check_cell(len(data), n, d)
                except ValueError as error:
                    raise UsageError(f"--data {args.data}: {error}") from None
        info = backend.info()
        check_server(info, args.lengths, args.max_new_tokens)
    log(f"{args.command}: server {args.target}, model {info.name}, limits: max_prompt_tokens "
        f"{info.max_prompt_tokens}, max_context {info.max_context}")

    t0 = time.monotonic()
    record: Dict[str, object] = {"eval": args.command, "version": JSON_VERSION,
                                 "target": args.target, "model": info.name,
                                 "data": data_record(args.data, data)}
    if args.command == "perplexity":
        results = run_perplexity(backend, data, args.lengths, args.max_bytes, log)
        record.update({"max_bytes": args.max_bytes, "results": results})
        table = perplexity.markdown_table(results)
    else:
        cells = run_passkey(backend, data, args.lengths, args.depths, args.keys, args.seed,
                            args.max_new_tokens, log)
        asked = sum(int(c["trials"]) for c in cells)
        record.update({
            "lengths": args.lengths, "depths": args.depths, "keys_per_cell": args.keys,
            "seed": args.seed, "max_new_tokens": args.max_new_tokens,
            "format": {"needle": retrieval.NEEDLE_TEMPLATE, "question": retrieval.QUESTION,
                       "answer": retrieval.ANSWER_TEMPLATE},
            "accuracy": sum(int(c["correct"]) for c in cells) / asked,
            "cells": cells,
        })
        table = passkey.markdown_table(cells, args.lengths, args.depths, perplexity.size_label)
    record["elapsed_seconds"] = time.monotonic() - t0
    print(table, end="", flush=True)
    if args.table:
        Path(args.table).write_text(table)
    if args.out:
        write_json(args.out, record)
    if args.command == "passkey" and args.plot:
        passkey.heatmap_png(record["cells"], args.lengths, args.depths,  # type: ignore[arg-type]
                            perplexity.size_label,
                            f"passkey retrieval: {info.name} ({args.keys} keys per cell)",
                            args.plot)
    return record


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None,
         backend_factory: Optional[Callable[[argparse.Namespace], Backend]] = None,
         log: Log = _stderr) -> int:
    """Runs one evaluation; returns the exit status. `backend_factory` replaces the gRPC
    connection (tests)."""
    args = build_parser().parse_args(argv)  # exits 2 on usage errors
    try:
        _validate(args)
        if backend_factory is None:
            from .backend import connect

            try:
                backend = connect(args.target, args.timeout, args.connect_timeout, tls=args.tls,
                                  tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                  tls_key=args.tls_key, server_name=args.server_name,
                                  token_file=args.token_file)
            except (OSError, ValueError) as error:
                raise UsageError(str(error)) from None
        else:
            backend = backend_factory(args)
        _run(args, backend, log)
        return 0
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (EvalError, ImportError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
