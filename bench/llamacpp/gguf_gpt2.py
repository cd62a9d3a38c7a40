"""Writes a GPT-2-architecture GGUF file with random weights, for llama.cpp in bench/vs_llamacpp.sh.

No `gguf` package and no download: the GGUF v3 container (header, typed key-value metadata, tensor
table, aligned tensor data) and the F32 / F16 / Q8_0 tensor encodings are written here from the
format's specification, so the comparison needs nothing but numpy. Weights are normal(0, 0.02)
like the engine's synthetic gpt2-small models (bench/engine_bench.cc), LayerNorms at identity and
biases at zero. The tokenizer is GPT-2's byte-level BPE alphabet (256 byte tokens) plus, for a
larger --vocab, two-byte tokens with their merges; the benchmark feeds token ids, never text.
  python3 bench/llamacpp/gguf_gpt2.py --out m.gguf --dtype f32|f16|q8_0 [--vocab 256] [--ctx 8192]
Shape letters: V vocabulary, T trained context (learned positions), C width, F MLP width (4C).
"""
from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, List, Sequence, Tuple

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# gguf_type: the type tags of metadata values.
GGUF_UINT32 = 4
GGUF_INT32 = 5
GGUF_FLOAT32 = 6
GGUF_STRING = 8
GGUF_ARRAY = 9

# ggml_type: the encodings of tensor data this writer produces.
GGML_F32 = 0
GGML_F16 = 1
GGML_Q8_0 = 8
QK8_0 = 32  # values per Q8_0 block: one fp16 scale + 32 int8 = 34 bytes
DTYPES = {"f32": GGML_F32, "f16": GGML_F16, "q8_0": GGML_Q8_0}
# general.file_type of llama.cpp (enum llama_ftype): ALL_F32, MOSTLY_F16, MOSTLY_Q8_0.
FILE_TYPES = {GGML_F32: 0, GGML_F16: 1, GGML_Q8_0: 7}


def gguf_string(text: str) -> bytes:
    """A GGUF string: uint64 byte length, then UTF-8 bytes without a terminator."""
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def kv_bytes(key: str, value_type: int, value: object) -> bytes:
    """One metadata pair: key, uint32 type tag, value (arrays: uint32 element type, uint64 count,
    elements). Only the types this writer needs: uint32, int32, float32, string, and arrays of them."""
    out = gguf_string(key) + struct.pack("<I", value_type)
    if value_type == GGUF_ARRAY:
        elem_type, items = value  # type: ignore[misc]
        out += struct.pack("<IQ", elem_type, len(items))
        return out + b"".join(scalar_bytes(elem_type, item) for item in items)
    return out + scalar_bytes(value_type, value)


def scalar_bytes(value_type: int, value: object) -> bytes:
    if value_type == GGUF_UINT32:
        return struct.pack("<I", value)
    if value_type == GGUF_INT32:
        return struct.pack("<i", value)
    if value_type == GGUF_FLOAT32:
        return struct.pack("<f", value)
    if value_type == GGUF_STRING:
        return gguf_string(str(value))
    raise ValueError(f"metadata type {value_type} is not written by this writer")


def quantize_q8_0(x: np.ndarray) -> bytes:
    """ggml's reference Q8_0 (quantize_row_q8_0_ref): per block of 32 values, d = max|x| / 127
    (stored as fp16), q = round-half-away-from-zero(x / d) as int8; float32 arithmetic throughout."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if flat.size % QK8_0:
        raise ValueError(f"Q8_0 needs a multiple of {QK8_0} values, got {flat.size}")
    blocks = flat.reshape(-1, QK8_0)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    scaled = blocks * inv[:, None]
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)
    out = np.empty(blocks.shape[0], dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))])
    out["d"] = d.astype(np.float16)
    out["qs"] = q
    return out.tobytes()


def encode(x: np.ndarray, ggml_type: int) -> bytes:
    """The tensor's data in `ggml_type`, rows in numpy (C) order, little-endian."""
    if ggml_type == GGML_F32:
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if ggml_type == GGML_F16:
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    if ggml_type == GGML_Q8_0:
        if x.shape[-1] % QK8_0:
            raise ValueError(f"Q8_0 rows need a multiple of {QK8_0} values, got shape {x.shape}")
        return quantize_q8_0(x)
    raise ValueError(f"ggml type {ggml_type} is not written by this writer")


def encoded_size(shape: Sequence[int], ggml_type: int) -> int:
    n = int(np.prod(shape))
    return {GGML_F32: 4 * n, GGML_F16: 2 * n, GGML_Q8_0: n // QK8_0 * (2 + QK8_0)}[ggml_type]


def tensor_info_bytes(name: str, shape: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """Name, uint32 n_dims, uint64 dims fastest-varying first (numpy's shape reversed), uint32
    ggml type, uint64 offset of the data from the start of the data section."""
    dims = list(reversed([int(d) for d in shape]))
    return (gguf_string(name) + struct.pack("<I", len(dims)) +
            struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset))


def pad(n: int) -> int:
    return (-n) % ALIGNMENT


def write_gguf(f: BinaryIO, metadata: List[bytes],
               tensors: Sequence[Tuple[str, Tuple[int, ...], int]],
               data: Iterator[np.ndarray]) -> int:
    """Writes a whole GGUF file: `metadata` from kv_bytes, `tensors` (name, numpy shape, ggml type)
    in file order, and `data` yielding each tensor's values in that order (so that a large model
    is never held whole). Every tensor's data starts on a multiple of ALIGNMENT. Returns bytes."""
    offsets = []
    offset = 0
    for _, shape, ggml_type in tensors:
        offsets.append(offset)
        offset += encoded_size(shape, ggml_type)
        offset += pad(offset)
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))
    head += b"".join(metadata)
    head += b"".join(tensor_info_bytes(name, shape, t, off)
                     for (name, shape, t), off in zip(tensors, offsets))
    head += b"\0" * pad(len(head))
    f.write(head)
    written = 0
    for (name, shape, ggml_type), values in zip(tensors, data):
        if tuple(values.shape) != tuple(shape):
            raise ValueError(f"tensor {name}: data of shape {values.shape}, table says {shape}")
        raw = encode(values, ggml_type)
        f.write(raw + b"\0" * pad(len(raw)))
        written += len(raw) + pad(len(raw))
    if written != offset:
        raise AssertionError(f"wrote {written} data bytes, the table promised {offset}")
    return len(head) + written


def byte_alphabet() -> List[str]:
    """GPT-2's bytes_to_unicode: each byte as the printable character its BPE vocabulary uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) +
                 list(range(ord("\xae"), ord("\xff") + 1)))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary(num_tokens: int) -> Tuple[List[str], List[str]]:
    """`num_tokens` BPE tokens: the 256 byte tokens, then two-byte tokens with one merge each."""
    if not 256 <= num_tokens <= 256 + 256 * 256:
        raise ValueError(f"--vocab {num_tokens}: must be in [256, 65792]")
    alphabet = byte_alphabet()
    tokens = list(alphabet)
    merges = []
    for i in range(num_tokens - 256):
        a, b = alphabet[i // 256], alphabet[i % 256]
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    return tokens, merges


def gpt2_tensor_table(n_layers: int, d_model: int, vocab: int, n_ctx: int,
                      weight_type: int) -> List[Tuple[str, Tuple[int, ...], int]]:
    """llama.cpp's GPT-2 tensors (LLM_ARCH_GPT2), numpy shapes [out, in]; the output projection is
    tied to token_embd (no output.weight). Matrices in `weight_type`, vectors in F32."""
    C, F = d_model, 4 * d_model
    table: List[Tuple[str, Tuple[int, ...], int]] = [
        ("token_embd.weight", (vocab, C), weight_type),
        ("position_embd.weight", (n_ctx, C), weight_type),
        ("output_norm.weight", (C,), GGML_F32),
        ("output_norm.bias", (C,), GGML_F32),
    ]
    for i in range(n_layers):
        p = f"blk.{i}."
        table += [
            (p + "attn_norm.weight", (C,), GGML_F32),
            (p + "attn_norm.bias", (C,), GGML_F32),
            (p + "attn_qkv.weight", (3 * C, C), weight_type),
            (p + "attn_qkv.bias", (3 * C,), GGML_F32),
            (p + "attn_output.weight", (C, C), weight_type),
            (p + "attn_output.bias", (C,), GGML_F32),
            (p + "ffn_norm.weight", (C,), GGML_F32),
            (p + "ffn_norm.bias", (C,), GGML_F32),
            (p + "ffn_up.weight", (F, C), weight_type),
            (p + "ffn_up.bias", (F,), GGML_F32),
            (p + "ffn_down.weight", (C, F), weight_type),
            (p + "ffn_down.bias", (C,), GGML_F32),
        ]
    return table


def random_values(table: Sequence[Tuple[str, Tuple[int, ...], int]],
                  seed: int) -> Iterator[np.ndarray]:
    """normal(0, 0.02) matrices and embeddings; LayerNorm weights 1; biases 0."""
    rng = np.random.default_rng(seed)
    for name, shape, _ in table:
        if len(shape) == 1:
            fill = 1.0 if name.endswith("norm.weight") else 0.0
            yield np.full(shape, fill, dtype=np.float32)
        else:
            yield (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))


def gpt2_metadata(n_layers: int, n_heads: int, d_model: int, n_ctx: int, tokens: List[str],
                  merges: List[str], weight_type: int) -> List[bytes]:
    return [
        kv_bytes("general.architecture", GGUF_STRING, "gpt2"),
        kv_bytes("general.name", GGUF_STRING, "random gpt2 (polysketch bench/vs_llamacpp.sh)"),
        kv_bytes("general.alignment", GGUF_UINT32, ALIGNMENT),
        kv_bytes("general.file_type", GGUF_UINT32, FILE_TYPES[weight_type]),
        kv_bytes("gpt2.context_length", GGUF_UINT32, n_ctx),
        kv_bytes("gpt2.embedding_length", GGUF_UINT32, d_model),
        kv_bytes("gpt2.feed_forward_length", GGUF_UINT32, 4 * d_model),
        kv_bytes("gpt2.block_count", GGUF_UINT32, n_layers),
        kv_bytes("gpt2.attention.head_count", GGUF_UINT32, n_heads),
        kv_bytes("gpt2.attention.layer_norm_epsilon", GGUF_FLOAT32, 1e-5),
        kv_bytes("tokenizer.ggml.model", GGUF_STRING, "gpt2"),
        kv_bytes("tokenizer.ggml.pre", GGUF_STRING, "gpt-2"),
        kv_bytes("tokenizer.ggml.tokens", GGUF_ARRAY, (GGUF_STRING, tokens)),
        kv_bytes("tokenizer.ggml.token_type", GGUF_ARRAY, (GGUF_INT32, [1] * len(tokens))),
        kv_bytes("tokenizer.ggml.merges", GGUF_ARRAY, (GGUF_STRING, merges)),
        kv_bytes("tokenizer.ggml.bos_token_id", GGUF_UINT32, 0),
        kv_bytes("tokenizer.ggml.eos_token_id", GGUF_UINT32, 0),
    ]


def write_gpt2(path: Path, dtype: str, vocab: int = 256, n_ctx: int = 8192, n_layers: int = 12,
               n_heads: int = 12, d_model: int = 768, seed: int = 1234) -> int:
    """Writes the whole model to `path` (through a temporary file); returns its size in bytes."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if d_model % n_heads or d_model % QK8_0:
        raise ValueError(f"width {d_model} must divide by {n_heads} heads and by {QK8_0}")
    if n_ctx < 1 or n_layers < 1:
        raise ValueError("--ctx and layers must be >= 1")
    weight_type = DTYPES[dtype]
    tokens, merges = vocabulary(vocab)
    table = gpt2_tensor_table(n_layers, d_model, vocab, n_ctx, weight_type)
    metadata = gpt2_metadata(n_layers, n_heads, d_model, n_ctx, tokens, merges, weight_type)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        size = write_gguf(f, metadata, table, random_values(table, seed))
    tmp.replace(path)
    return size


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                        help="matrices' encoding (vectors stay f32)")
    parser.add_argument("--vocab", type=int, default=256,
                        help="tokens: 256 is the engine's byte vocabulary, 50257 GPT-2's")
    parser.add_argument("--ctx", type=int, default=8192,
                        help="trained context = rows of the learned position table")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    try:
        size = write_gpt2(args.out, args.dtype, vocab=args.vocab, n_ctx=args.ctx, seed=args.seed)
    except ValueError as e:
        print(f"gguf_gpt2: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {size} bytes, gpt2 12x768, vocab {args.vocab}, ctx {args.ctx}, "
          f"{args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

