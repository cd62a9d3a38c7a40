"""The GGUF writer of bench/llamacpp/gguf_gpt2.py against bytes worked out by hand from the format.

The llama.cpp comparison (bench/vs_llamacpp.sh) loads what this writer makes; these tests pin the
container (header, metadata, tensor table, alignment) and the F16 / Q8_0 encodings so that a
mistake shows here, without node or llama.cpp, rather than as a load failure in the benchmark.
"""
import io
import struct
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "bench" / "llamacpp"))
import gguf_gpt2 as g  # noqa: E402


def le64(n: int) -> bytes:
    return struct.pack("<Q", n)


def le32(n: int) -> bytes:
    return struct.pack("<I", n)


def test_string_is_length_then_utf8_without_terminator() -> None:
    assert g.gguf_string("ab") == b"\x02\x00\x00\x00\x00\x00\x00\x00ab"
    assert g.gguf_string("Ġ") == le64(2) + b"\xc4\xa0"  # length in bytes, not characters


def test_scalar_and_array_metadata() -> None:
    assert g.kv_bytes("k", g.GGUF_UINT32, 7) == le64(1) + b"k" + le32(4) + le32(7)
    assert g.kv_bytes("e", g.GGUF_FLOAT32, 1.0) == le64(1) + b"e" + le32(6) + b"\x00\x00\x80\x3f"
    assert (g.kv_bytes("t", g.GGUF_ARRAY, (g.GGUF_STRING, ["a", "bc"])) ==
            le64(1) + b"t" + le32(9) + le32(8) + le64(2) + le64(1) + b"a" + le64(2) + b"bc")
    assert (g.kv_bytes("i", g.GGUF_ARRAY, (g.GGUF_INT32, [1, -1])) ==
            le64(1) + b"i" + le32(9) + le32(5) + le64(2) + b"\x01\0\0\0\xff\xff\xff\xff")


def test_tensor_info_reverses_numpy_shape() -> None:
    # numpy [rows=2, cols=32] is ggml ne = {32, 2}: the fastest-varying dimension first.
    assert (g.tensor_info_bytes("w", (2, 32), g.GGML_Q8_0, 64) ==
            le64(1) + b"w" + le32(2) + le64(32) + le64(2) + le32(8) + le64(64))


def test_f16_encoding() -> None:
    assert g.encode(np.array([1.0, -2.0, 0.5], np.float32), g.GGML_F16) == b"\x00\x3c\x00\xc0\x00\x38"


def test_q8_0_block_scale_one_rounds_half_away_from_zero() -> None:
    # max|x| = 127 gives d = 1 (fp16 0x3C00), so q is x rounded; .5 goes away from zero (roundf),
    # not to even: 2.5 -> 3, -0.5 -> -1.
    x = np.zeros(32, np.float32)
    x[:6] = [127.0, 0.5, -0.5, 2.5, -2.5, 1.4]
    expected = b"\x00\x3c" + bytes([127, 1, 0xFF, 3, 0xFD, 1]) + bytes(26)
    assert g.quantize_q8_0(x) == expected


def test_q8_0_scale_two_and_zero_block() -> None:
    # Block 0: max|x| = 254 -> d = 2 (fp16 0x4000); 3 -> 1.5 -> 2, -5 -> -2.5 -> -3, -254 -> -127.
    # Block 1: all zeros -> d = 0 and q = 0 (no division by zero).
    x = np.zeros(64, np.float32)
    x[:3] = [3.0, -5.0, -254.0]
    expected = b"\x00\x40" + bytes([2, 0xFD, 0x81]) + bytes(29) + b"\x00\x00" + bytes(32)
    assert g.quantize_q8_0(x) == expected
    assert g.encoded_size((2, 32), g.GGML_Q8_0) == 68


def test_q8_0_rejects_rows_that_do_not_fill_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        g.encode(np.zeros((2, 48), np.float32), g.GGML_Q8_0)


def test_whole_file_layout_by_hand() -> None:
    # 1 metadata pair, two tensors: a 3-float F32 vector (12 bytes, padded to 32) and a [2, 32] F16
    # matrix (128 bytes) whose offset is therefore 32.
    meta = [g.kv_bytes("general.alignment", g.GGUF_UINT32, 32)]
    table = [("v", (3,), g.GGML_F32), ("m", (2, 32), g.GGML_F16)]
    values = [np.array([1.0, 2.0, 3.0], np.float32), np.ones((2, 32), np.float32)]
    f = io.BytesIO()
    size = g.write_gguf(f, meta, table, iter(values))
    data = f.getvalue()
    head = (b"GGUF" + le32(3) + le64(2) + le64(1) +
            le64(17) + b"general.alignment" + le32(4) + le32(32) +
            le64(1) + b"v" + le32(1) + le64(3) + le32(0) + le64(0) +
            le64(1) + b"m" + le32(2) + le64(32) + le64(2) + le32(1) + le64(32))
    assert len(head) == 24 + 33 + 33 + 41 == 131  # header, the pair, the two table entries
    assert data[:131] == head
    assert data[131:160] == bytes(29)  # pad to 160, a multiple of 32: the data section
    assert data[160:172] == struct.pack("<3f", 1.0, 2.0, 3.0)
    assert data[172:192] == bytes(20)
    assert data[192:320] == b"\x00\x3c" * 64
    assert size == len(data) == 320


def test_write_gguf_checks_data_against_table() -> None:
    with pytest.raises(ValueError, match="tensor v"):
        g.write_gguf(io.BytesIO(), [], [("v", (3,), g.GGML_F32)], iter([np.zeros(4, np.float32)]))


def test_byte_alphabet_is_gpt2s() -> None:
    alphabet = g.byte_alphabet()
    assert len(set(alphabet)) == 256
    assert alphabet[ord("!")] == "!" and alphabet[ord("~")] == "~"
    assert alphabet[0] == "\u0100"  # the first non-printable byte maps to chr(256)
    assert alphabet[ord(" ")] == "\u0120" and alphabet[ord("\n")] == "\u010a"  # 'Ġ' and 'Ċ'
    tokens, merges = g.vocabulary(258)
    assert tokens[256:] == ["\u0100\u0100", "\u0100\u0101"]
    assert merges == ["\u0100 \u0100", "\u0100 \u0101"]
    with pytest.raises(ValueError):
        g.vocabulary(255)


def read_gguf(data: bytes) -> Tuple[Dict[str, object], List[Tuple[str, List[int], int, int]], int]:
    """A reader independent of the writer: metadata, tensor table and the data section's start."""
    pos = 0

    def take(fmt: str) -> Tuple:
        nonlocal pos
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def value(t: int) -> object:
        scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                   11: "q", 12: "d"}
        if t == 8:
            return string()
        if t == 9:
            et, n = take("IQ")
            return [value(et) for _ in range(n)]
        return take(scalars[t])[0]

    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    assert version == 3
    meta = {}
    for _ in range(n_kv):
        key = string()
        (t,) = take("I")
        meta[key] = value(t)
    tensors = []
    for _ in range(n_tensors):
        name = string()
        (nd,) = take("I")
        dims = list(take(f"{nd}Q"))
        t, off = take("IQ")
        tensors.append((name, dims, t, off))
    align = int(meta.get("general.alignment", 32))  # type: ignore[call-overload]
    return meta, tensors, pos + (-pos) % align


def test_small_gpt2_file_has_what_llama_cpp_reads(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    size = g.write_gpt2(path, "q8_0", vocab=260, n_ctx=16, n_layers=2, n_heads=2, d_model=64)
    data = path.read_bytes()
    assert size == len(data)
    meta, tensors, start = read_gguf(data)
    assert meta["general.architecture"] == "gpt2"
    assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (meta["gpt2.block_count"], meta["gpt2.embedding_length"],
            meta["gpt2.feed_forward_length"], meta["gpt2.attention.head_count"],
            meta["gpt2.context_length"]) == (2, 64, 256, 2, 16)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 260  # type: ignore[arg-type]
    assert len(meta["tokenizer.ggml.merges"]) == 4  # type: ignore[arg-type]
    assert len(tensors) == 4 + 12 * 2
    by_name = {name: (dims, t, off) for name, dims, t, off in tensors}
    assert by_name["token_embd.weight"][:2] == ([64, 260], g.GGML_Q8_0)
    assert by_name["position_embd.weight"][:2] == ([64, 16], g.GGML_Q8_0)
    assert by_name["blk.1.attn_qkv.weight"][:2] == ([64, 192], g.GGML_Q8_0)
    assert by_name["blk.1.ffn_down.weight"][:2] == ([256, 64], g.GGML_Q8_0)
    assert by_name["blk.0.ffn_up.bias"][:2] == ([256], g.GGML_F32)
    assert start % 32 == 0
    end = 0
    for name, dims, t, off in tensors:
        assert off % 32 == 0, name
        assert off >= end, name  # in order, no overlap
        end = off + g.encoded_size(list(reversed(dims)), t)
    assert start + end + (-end) % 32 == len(data)
    # LayerNorm weights are 1, biases 0: the F32 vectors read back exactly.
    dims, t, off = by_name["blk.0.attn_norm.weight"]
    assert np.frombuffer(data, "<f4", 64, start + off).tolist() == [1.0] * 64
    dims, t, off = by_name["blk.0.attn_qkv.bias"]
    assert not np.frombuffer(data, "<f4", 192, start + off).any()


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--dtype"):
        g.write_gpt2(tmp_path / "m.gguf", "q4_0")
    assert g.main(["--out", str(tmp_path / "m.gguf"), "--vocab", "10"]) == 2
    assert not (tmp_path / "m.gguf").exists()
