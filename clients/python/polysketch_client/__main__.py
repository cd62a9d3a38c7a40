"""Command line: python3 -m polysketch_client {generate,info,health,tokenize,cancel} ...

Exit codes: 0 ok, 1 RPC error (code name and message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from .client import SERVICE_NAME, GeneratedToken, PolysketchClient, PolysketchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m polysketch_client", description=__doc__)
    p.add_argument("--target", default="localhost:50051", help="server host:port")
    p.add_argument("--timeout", type=float, default=None, help="gRPC deadline in seconds")
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    p.add_argument("--tls_ca", default=None, help="PEM CA bundle of the server (implies TLS)")
    p.add_argument("--tls_cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls_key", default=None, help="PEM private key of --tls_cert")
    p.add_argument("--server_name", default=None, help="name to check the certificate against")
    p.add_argument("--token", default=None, help="bearer token (prefer --token_file)")
    p.add_argument("--token_file", default=None, help="file whose first line is the token")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams unless --unary)")
    g.add_argument("--prompt", default=None, help="prompt text")
    g.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    g.add_argument("--unary", action="store_true", help="use Generate instead of GenerateStream")
    g.add_argument("--json", action="store_true", help="print the whole result as JSON")
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="unset: the server default (256); 0 generates nothing (scoring)",
    )
    g.add_argument("--min_new_tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--min_p", type=float, default=0.0)
    g.add_argument("--repetition_penalty", type=float, default=None)
    g.add_argument("--presence_penalty", type=float, default=0.0)
    g.add_argument("--frequency_penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop_token_ids", type=int, nargs="*", default=[])
    g.add_argument("--ignore_eos", action="store_true")
    g.add_argument("--include_stop_string", action="store_true")
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--top_logprobs", type=int, default=0)
    g.add_argument(
        "--prompt_logprobs",
        action="store_true",
        help="log-probability of every prompt token after the first (printed to stderr)",
    )
    g.add_argument("--prompt_top_logprobs", type=int, default=0, help="alternatives, 0..20")
    g.add_argument("--time_limit_ms", type=int, default=0)
    g.add_argument("--request_id", default="")

    sub.add_parser("info", help="print the served model")
    sub.add_parser("health", help="check liveness and readiness")
    t = sub.add_parser("tokenize", help="print the token ids of a text")
    t.add_argument("--prompt", default=None)
    t.add_argument("--prompt_file", default=None)
    c = sub.add_parser("cancel", help="cancel a request by id")
    c.add_argument("--request_id", required=True)
    return p


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    return args.prompt or ""


def _print_prompt_logprobs(entries: List[GeneratedToken], index: int) -> int:
    """One stderr line per prompt token from prompt index `index`; returns the next index."""
    for entry in entries:
        alts = " | ".join(f"{tid} {chr(tid)!r}:{lp:.4f}" for tid, lp in entry.top_logprobs)
        token = f"{entry.token_id} {chr(entry.token_id)!r}"
        line = f"prompt[{index}] {token} logprob {entry.logprob:.4f}"
        print(line + (f" | {alts}" if alts else ""), file=sys.stderr)
        index += 1
    return index


def _run(args: argparse.Namespace, client: PolysketchClient) -> int:
    if args.command == "generate":
        params = {
            k: getattr(args, k)
            for k in (
                "max_new_tokens min_new_tokens temperature top_k top_p min_p repetition_penalty "
                "presence_penalty frequency_penalty seed stop_token_ids ignore_eos "
                "include_stop_string logprobs top_logprobs time_limit_ms request_id "
                "prompt_logprobs prompt_top_logprobs"
            ).split()
        }
        params["stop"] = args.stop
        prompt = _prompt(args)
        if args.unary or args.json:
            result = client.generate(prompt, **params)
            if args.json:
                print(json.dumps(dataclasses.asdict(result), indent=2))
                return 0
            _print_prompt_logprobs(result.prompt_logprobs, 1)
            sys.stdout.write(result.text)
            final = result.final
        else:
            final = None
            index = 1
            for chunk in client.generate_stream(prompt, **params):
                index = _print_prompt_logprobs(chunk.prompt_logprobs, index)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                final = chunk.final or final
        sys.stdout.flush()
        if final is None:
            print("stream ended without final info", file=sys.stderr)
            return 1
        print(f"\n[{final}]", file=sys.stderr)
        return 1 if final.finish_reason == "ERROR" else 0
    if args.command == "info":
        print(json.dumps(dataclasses.asdict(client.model_info()), indent=2))
        return 0
    if args.command == "health":
        code = 0
        for service in ("", SERVICE_NAME):
            status = client.health(service)
            label = service or '""'
            print(f"{label}: {status}")
            code = code or (0 if status == "SERVING" else 1)
        return code
    if args.command == "tokenize":
        print(" ".join(str(i) for i in client.tokenize(_prompt(args))))
        return 0
    if args.command == "cancel":
        client.cancel(args.request_id)
        print(f"cancelled {args.request_id}")
        return 0
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on usage errors
    try:
        client = PolysketchClient(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            server_name=args.server_name,
            token=args.token,
            token_file=args.token_file,
        )
    except (OSError, ValueError) as error:
        print(f"polysketch_client: {error}", file=sys.stderr)
        return 2
    with client:
        try:
            return _run(args, client)
        except PolysketchError as error:
            print(f"polysketch_client: {error.code}: {error.details}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
