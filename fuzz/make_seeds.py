#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/corpus/ (docs/reliability.md, "Fuzzing").

Seeds are small, valid (or deliberately nearly valid) inputs that show each fuzz target the shape
of what it parses: tiny model directories of every attention kind written by the PyTorch
reference's own exporter (train/modelio.py), the configs of tests/golden and models/, the header of
a shipped model, UTF-8 edge cases and wire-format GenerateRequests (protoc --encode). The seeds of
stop_checker_fuzz come from a minimised fuzzing run instead (FuzzedDataProvider's layout is not
meant to be written by hand). Run with Debian's python: /usr/bin/python3 fuzz/make_seeds.py
"""
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))

import torch  # noqa: E402

from model import ModelConfig, PolySketchFormer  # noqa: E402
from modelio import save_model_dir  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"

OPENAI_SEEDS = {
    "completion": '{"model": "tiny-polysketch", "prompt": "And God said", "max_tokens": 16}',
    "everything": '{"prompt": "In the beginning", "max_tokens": 100, "temperature": 0.7, '
                  '"top_p": 0.9, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5, '
                  '"frequency_penalty": -0.5, "repetition_penalty": 1.1, "seed": 42, '
                  '"stop": ["\\n\\n", "Amen"], "stop_token_ids": [10], "min_tokens": 2, '
                  '"logprobs": 5, "echo": true, "stream": true, '
                  '"stream_options": {"include_usage": true}, "user": "u", "n": 1}',
    "token-ids": '{"prompt": [65, 110, 100], "max_tokens": 0, "echo": true, "logprobs": 1}',
    "chat": '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", '
            '"content": [{"type": "text", "text": "Who?"}]}, {"role": "assistant", '
            '"content": null}], "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 9}',
    "session": '{"prompt": "x", "session_id": "s-1"}',
    "bad-type": '{"prompt": "x", "temperature": "hot"}',
    "bad-range": '{"prompt": "x", "top_p": 0}',
    "bad-json": '{"prompt": "x",',
    "unsupported": '{"prompt": "x", "logit_bias": {"1": 2}, "n": 2}',
}

# One tiny model per attention kind: V=8, D=4, one head of width 4, so each file is ~1 KB.
TINY_LAYERS = {
    "softmax": {"kind": "softmax"},
    "polynomial": {"kind": "polynomial"},
    "polysketch-random": {"kind": "polysketch", "sketch": "random", "sketch_size": 2},
    "polysketch-learned-local": {"kind": "polysketch", "sketch": "learned", "sketch_size": 2,
                                 "local_exact": True, "block_size": 4},
    "sliding-window": {"kind": "sliding_window", "window": 3},
    "sparse-strided": {"kind": "sparse_strided", "window": 2, "stride": 2},
    "sparse-fixed": {"kind": "sparse_fixed", "chunk": 4, "summary": 1},
}


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def tiny_model(layer: dict, storage: str) -> tuple:
    cfg = ModelConfig.from_json({
        "architecture": "polysketchformer", "vocab_size": 8, "d_model": 4, "n_layers": 1,
        "n_heads": 1, "d_ff": 4, "max_seq_len": 16, "layers": [layer]})
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(PolySketchFormer(cfg), Path(tmp), storage=storage)
        return (Path(tmp, "config.json").read_bytes(), Path(tmp, "model.safetensors").read_bytes())


def header_of(file: bytes) -> bytes:
    (n,) = struct.unpack("<Q", file[:8])
    return file[8:8 + n]


def main() -> None:
    # Model files of every kind, in two storage dtypes.
    for kind, layer in TINY_LAYERS.items():
        for storage in ("f16", "f32") if kind == "softmax" else ("f16",):
            config, st = tiny_model(layer, storage)
            write("model_config_fuzz", f"tiny-{kind}.json", config)
            write("safetensors_file_fuzz", f"tiny-{kind}-{storage}.safetensors", st)
            data_bytes = len(st) - 8 - len(header_of(st))
            write("safetensors_header_fuzz", f"tiny-{kind}-{storage}",
                  struct.pack("<I", data_bytes) + header_of(st))
            write("model_weights_fuzz", f"tiny-{kind}-{storage}",
                  struct.pack("<I", len(config)) + config + st)

    # Every dtype and the shapes the parser must take: scalar, empty, metadata.
    tensors = {
        "f64": ("F64", [2], struct.pack("<2d", 0.1, -1e300)),
        "bf16": ("BF16", [2, 1], struct.pack("<2H", 0x3F80, 0xC040)),
        "i64": ("I64", [2], struct.pack("<2q", -(1 << 40), 7)),
        "i32": ("I32", [1], struct.pack("<i", -7)),
        "u8": ("U8", [3], b"\x00\x01\xff"),
        "scalar": ("F32", [], struct.pack("<f", 2.5)),
        "empty": ("F32", [0, 4], b""),
    }
    header, data = {"__metadata__": {"format": "polysketch"}}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    write("safetensors_file_fuzz", "every-dtype.safetensors",
          struct.pack("<Q", len(text)) + text + data)
    write("safetensors_header_fuzz", "every-dtype", struct.pack("<I", len(data)) + text)
    write("safetensors_file_fuzz", "empty.safetensors", struct.pack("<Q", 2) + b"{}")

    # The header of a shipped model (its data section is too large to check in): real names,
    # shapes and offsets, refused here for lack of data but parsed entry by entry first.
    shipped = (ROOT / "models" / "tiny-softmax" / "model.safetensors").read_bytes()[:200_000]
    write("safetensors_header_fuzz", "tiny-softmax-shipped",
          struct.pack("<I", 0) + header_of(shipped))

    # Configs: the shipped models and every golden fixture.
    for path in sorted(list((ROOT / "models").glob("*/config.json")) +
                       list((ROOT / "tests" / "golden").glob("*/config.json"))):
        write("model_config_fuzz", f"{path.parent.parent.name}-{path.parent.name}.json",
              path.read_bytes())

    # Text: ASCII, every UTF-8 length, and each kind of ill-formed sequence.
    texts = {
        "ascii": b"And God said, Let there be light: and there was light.",
        "multibyte": "h\u00e9llo w\u00f6rld \u2014 \u65e5\u672c\u8a9e \U0001F642".encode(),
        "overlong": b"a\xc0\x80b\xe0\x80\x80c",
        "surrogate": b"\xed\xa0\x80\xed\xbf\xbf",
        "past-max": b"\xf4\x90\x80\x80\xf5\xff",
        "truncated": b"\xe6\x97\xa5\xe6\x97\xf0\x9f\x99",
        "stray-continuation": b"\x80\xbf\xc2\x41",
    }
    for name, text in texts.items():
        write("tokenizer_fuzz", name, text)

    # Wire-format requests: valid ones of each prompt kind and option, and typical mistakes.
    proto = ROOT / "proto" / "polysketch" / "v1" / "generation.proto"
    requests = {
        "text": 'text: "And God said"',
        "token-ids": "token_ids { ids: [65, 110, 100] } max_new_tokens: 8",
        "everything": 'request_id: "req-1" text: "In the beginning" '
                      "sampling { temperature: 0.7 top_k: 40 top_p: 0.9 min_p: 0.05 "
                      "repetition_penalty: 1.1 presence_penalty: 0.5 frequency_penalty: -0.5 "
                      "seed: 42 } "
                      'stop { stop_strings: ["\\n\\n", "Amen"] stop_token_ids: [10] '
                      "include_stop_string: true ignore_eos: true } "
                      "max_new_tokens: 100 min_new_tokens: 2 logprobs: true top_logprobs: 5 "
                      "time_limit_ms: 1000",
        "greedy": 'text: "x" sampling { temperature: 0 }',
        "bad-utf8": 'text: "caf\\303"',
        "bad-token": "token_ids { ids: [300] }",
        "bad-top-p": 'text: "x" sampling { top_p: 0 }',
        "no-prompt": 'request_id: "r"',
        "prompt-logprobs": 'text: "In the beginning" max_new_tokens: 0 prompt_logprobs: true '
                           "prompt_top_logprobs: 5",
        "bad-prompt-top": 'text: "x" prompt_top_logprobs: 3',
    }
    for name, text in requests.items():
        wire = subprocess.run(
            ["protoc", f"--proto_path={proto.parent.parent.parent}",
             "--encode=polysketch.v1.GenerateRequest", str(proto)],
            input=text.encode(), capture_output=True, check=True).stdout
        write("request_fuzz", name, wire)

    # OpenAI-compatible request bodies (completions and chat; the target runs both).
    for name, body in OPENAI_SEEDS.items():
        write("openai_request_fuzz", name, body.encode())


if __name__ == "__main__":
    main()
