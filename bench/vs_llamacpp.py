"""The engine against llama.cpp at batch 1, same threads, same contexts (issue 19 item 4).

For each thread count and weight format it runs, one after the other:
  * llama.cpp (node-llama-cpp's prebuilt CPU binary, bench/llamacpp/bench.mjs) on a GPT-2-small
    GGUF with random weights that bench/llamacpp/gguf_gpt2.py writes for the run: f32, f16 or
    q8_0 matrices, llama.cpp's default f16 KV cache unless --llama-kv says otherwise;
  * the engine's polysketch-bench on its synthetic gpt2-small-softmax and gpt2-small-polysketch
    models with the same format: fp32 weights today; bf16 / int8 weights (--weights_dtype) and a
    16-bit KV cache for the softmax baseline (--kv_cache_dtype fp16) where the binary has those
    flags, and a row "not available in this build" where it does not (nothing is substituted).
Prefill tokens/s = context / time to prefill one sequence of `context` random tokens from position
0; decode tokens/s = 1 / mean step time of --steps (256) steps after 2 warm-ups, from that
context on (the median is kept as median_step_ms); memory per
sequence = the engine's attention state (polysketch: constant slot; softmax: KV rows of the
context) and llama.cpp's KV rows of the context (layers x 2 x 768 x cache bytes). One JSON object
per line goes to --out, and a markdown table to --table.
  python3 bench/vs_llamacpp.py --contexts 1024,2048 --threads 1,2 --formats fp32,16bit,8bit
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
LLAMA_DIR = ROOT / "bench" / "llamacpp"
# format -> (GGUF matrices, engine --weights_dtype, engine softmax --kv_cache_dtype)
FORMATS = {
    "fp32": ("f32", "fp32", None),
    "16bit": ("f16", "bf16", "fp16"),
    "8bit": ("q8_0", "int8", "fp16"),
}
ENGINE_MODELS = ("gpt2-small-polysketch", "gpt2-small-softmax")
NOT_AVAILABLE = "not available in this build"


def int_list(text: str) -> List[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': a comma list of integers >= 1")
    return values


def engine_flags(bench: Path) -> str:
    """The binary's flag list (--helpfull), to see which formats this build offers."""
    out = subprocess.run([str(bench), "--helpfull"], capture_output=True, text=True)
    return out.stdout + out.stderr


def run_engine(bench: Path, model: str, fmt: str, contexts: Sequence[int], threads: int,
               steps: int, flags: str) -> List[Dict[str, object]]:
    _, weights_dtype, kv_dtype = FORMATS[fmt]
    base: Dict[str, object] = {"side": "engine", "model": model, "format": fmt,
                               "threads": threads, "weights_dtype": weights_dtype}
    if model.endswith("-softmax"):
        base["kv_cache_dtype"] = kv_dtype or "fp32"
    extra: List[str] = []
    if weights_dtype != "fp32":
        if "weights_dtype" not in flags:
            return [dict(base, context=c, status=NOT_AVAILABLE + " (no --weights_dtype)")
                    for c in contexts]
        extra.append(f"--weights_dtype={weights_dtype}")
    if kv_dtype and model.endswith("-softmax"):
        if "kv_cache_dtype" not in flags:
            return [dict(base, context=c, status=NOT_AVAILABLE + " (no --kv_cache_dtype)")
                    for c in contexts]
        extra.append(f"--kv_cache_dtype={kv_dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        out_csv = Path(tmp) / "out.csv"
        cmd = [str(bench), f"--model={model}", "--device=cpu", f"--threads={threads}",
               "--batches=1", f"--steps={steps}", "--copy_mib=256",
               "--contexts=" + ",".join(map(str, contexts)), f"--csv={out_csv}"] + extra
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return [dict(base, context=c, status="failed: " + proc.stderr.strip()[-300:])
                    for c in contexts]
        header = proc.stdout.splitlines()[0] if proc.stdout else ""
        rows = list(csv.DictReader(out_csv.open()))
    out = []
    for row in rows:
        context = int(row["context"])
        prefill_s = float(row["prefill_s"])
        # The mean step (median where an older binary has no mean column).
        step_ms = float(row.get("mean_step_ms") or row["step_ms"])
        out.append(dict(base, context=context, status="ok", prefill_s=prefill_s,
                        prefill_tokens_per_s=context / prefill_s,
                        step_ms=step_ms, median_step_ms=float(row["step_ms"]),
                        decode_tokens_per_s=1e3 / step_ms,
                        memory_per_seq_bytes=int(row["attention_bytes_per_request"]),
                        copy_gb_per_s=float(row["copy_gb_per_s"]), bench_header=header))
    return out


def node_command() -> List[str]:
    """node, inside a fresh network namespace where one can be made: proof that llama.cpp is not
    downloaded or built at run time (it could not be)."""
    try:
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "--net", "node"]
    except FileNotFoundError:
        pass
    return ["node"]


def run_llama(gguf: Path, fmt: str, contexts: Sequence[int], threads: int, steps: int,
              kv: str) -> List[Dict[str, object]]:
    cmd = node_command() + [str(LLAMA_DIR / "bench.mjs"), "--model", str(gguf),
                            "--contexts", ",".join(map(str, contexts)),
                            "--threads", str(threads), "--steps", str(steps), "--kv", kv]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=LLAMA_DIR)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = {r["context"] for r in rows}
    base = {"side": "llama.cpp", "model": "gpt2 (random, " + FORMATS[fmt][0] + ")",
            "format": fmt, "threads": threads}
    out = []
    for r in rows:
        r.update(base, status="ok", memory_per_seq_bytes=r["kv_bytes_per_seq"],
                 weights_dtype=FORMATS[fmt][0])
        out.append(r)
    for c in contexts:
        if c not in done:
            out.append(dict(base, context=c, status="failed: " + proc.stderr.strip()[-300:]))
    return out


def mib(n: object) -> str:
    return f"{int(n) / 2**20:.1f}"  # type: ignore[call-overload]


def table(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| threads | format | context | system | weights | KV / state | decode tok/s | "
             "prefill tok/s | memory per sequence (MiB) |",
             "| ---: | --- | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    order = {"gpt2-small-polysketch": 0, "gpt2-small-softmax": 1}
    def key(r: Dict[str, object]) -> tuple:
        return (r["threads"], list(FORMATS).index(str(r["format"])), r["context"],
                order.get(str(r["model"]), 2))
    for r in sorted(rows, key=key):
        if r["side"] == "engine":
            system = "engine " + str(r["model"]).replace("gpt2-small-", "")
            state = ("KV " + str(r.get("kv_cache_dtype"))
                     if "kv_cache_dtype" in r else "sketch state fp32")
        else:
            system = "llama.cpp gpt2"
            state = f"KV {str(r.get('kv_type', '?')).lower()}"
            if r.get("flash_attention") is not None:
                state += ", flash attn" if r["flash_attention"] else ", no flash attn"
        if r["status"] != "ok":
            cells = [str(r["status"]), "", ""]
        else:
            cells = [f"{float(r['decode_tokens_per_s']):.1f}",  # type: ignore[arg-type]
                     f"{float(r['prefill_tokens_per_s']):.0f}",  # type: ignore[arg-type]
                     mib(r["memory_per_seq_bytes"])]
        lines.append(f"| {r['threads']} | {r['format']} | {r['context']} | {system} | "
                     f"{r['weights_dtype']} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int_list, default=int_list("1024,4096,16384,65536"))
    parser.add_argument("--threads", type=int_list, default=int_list("2"))
    parser.add_argument("--formats", default="fp32,16bit,8bit")
    parser.add_argument("--steps", type=int, default=256,
                        help="timed decode steps; decode tok/s = 1 / their mean. 256 = one "
                             "local_exact block of gpt2-small-polysketch, whose first 32 steps "
                             "also fold the previous block (the lazy fold): a block's mean is "
                             "what a stream of tokens costs")
    parser.add_argument("--llama-kv", default="F16", choices=("F16", "F32", "Q8_0"),
                        help="llama.cpp's KV cache type (F16 is its default)")
    parser.add_argument("--vocab", type=int, default=256,
                        help="GGUF vocabulary: 256 = the engine's byte vocabulary; 50257 = GPT-2's")
    parser.add_argument("--bench", type=Path, default=ROOT / "build" / "bench" / "polysketch-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vs_llamacpp.jsonl")
    parser.add_argument("--table", type=Path, default=None,
                        help="markdown table (default: --out with .md)")
    parser.add_argument("--label", default="", help="recorded with every row (machine, load)")
    parser.add_argument("--skip", default="", help="comma list of sides to leave out: engine, llama")
    parser.add_argument("--models", default=",".join(ENGINE_MODELS),
                        help="comma list of the engine models to run (a long softmax prefill "
                             "takes tens of minutes: leave it out of a sweep that does not need "
                             "it)")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in FORMATS:
            parser.error(f"--formats: '{f}' is not one of {', '.join(FORMATS)}")
    skip = set(s for s in args.skip.split(",") if s)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ENGINE_MODELS:
            parser.error(f"--models: '{m}' is not one of {', '.join(ENGINE_MODELS)}")
    if "engine" not in skip and not args.bench.exists():
        parser.error(f"{args.bench} is missing: scripts/build polysketch-bench")
    if "llama" not in skip and not (LLAMA_DIR / "node_modules" / "node-llama-cpp").exists():
        parser.error("node-llama-cpp is not installed: bench/llamacpp/setup")
    flags = engine_flags(args.bench) if "engine" not in skip else ""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    meta = {"started": started, "cpu": cpu, "cores": os.cpu_count(), "label": args.label,
            "steps": args.steps, "vocab_gguf": args.vocab}
    rows: List[Dict[str, object]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gguf_dir = Path(tempfile.mkdtemp(prefix="vs_llamacpp_"))
    try:
        with args.out.open("a") as out:
            def emit(batch: List[Dict[str, object]]) -> None:
                for r in batch:
                    r.update(meta)
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    rows.append(r)
            # Learned positions must cover the longest context plus the decode steps.
            # llama.cpp rounds a context up to a multiple of 256; so does the table.
            n_ctx = (max(args.contexts) + args.steps + 16 + 255) // 256 * 256
            for fmt in formats:
                gguf: Optional[Path] = None
                if "llama" not in skip:
                    gguf = gguf_dir / f"gpt2-{FORMATS[fmt][0]}.gguf"
                    subprocess.run([sys.executable, str(LLAMA_DIR / "gguf_gpt2.py"), "--out",
                                    str(gguf), "--dtype", FORMATS[fmt][0], "--vocab",
                                    str(args.vocab), "--ctx", str(n_ctx)], check=True,
                                   stdout=sys.stderr)
                for threads in args.threads:
                    if gguf is not None:
                        emit(run_llama(gguf, fmt, args.contexts, threads, args.steps,
                                       args.llama_kv))
                    if "engine" not in skip:
                        for model in models:
                            emit(run_engine(args.bench, model, fmt, args.contexts, threads,
                                            args.steps, flags))
                if gguf is not None:
                    gguf.unlink()
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
    text = table(rows)
    table_path = args.table or args.out.with_suffix(".md")
    table_path.write_text(f"<!-- {started}, {cpu}, {os.cpu_count()} cores; {args.label} -->\n"
                          + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
