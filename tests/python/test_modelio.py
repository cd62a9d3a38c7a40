"""Model directories on disk (docs/model-format.md): the safetensors reader and writer, whole-model
save/load, and the validation errors, each of which must name the file (and the tensor)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch

import modelio
from helpers import make_model, make_tokens

INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN, -0.0 and bf16 compare exactly."""
    if t.is_floating_point():
        return t.contiguous().view(INT_OF_SIZE[t.element_size()])
    return t


def sample_tensors() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.5])
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f32_special": special,
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "bf16": torch.randn(2, 3, 3, generator=g).to(torch.bfloat16),
        "i32": torch.randint(-2**31, 2**31 - 1, (5,), generator=g, dtype=torch.int64).to(
            torch.int32),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 1]),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def split_file(path: Path):
    """(header dict, data section bytes) of a safetensors file."""
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + hlen]), data[8 + hlen:]


def write_raw(path: Path, header: Any, body: bytes) -> None:
    """A safetensors file with an arbitrary header (dict/list -> JSON, bytes as they are)."""
    hbytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hbytes)) + hbytes + body)


def expect_error(path: Path, *names: str, call: Callable[[Path], Any] = modelio.read_safetensors):
    """Asserts call(path) raises ValueError whose message names str(path) and every name."""
    with pytest.raises(ValueError) as info:
        call(path)
    msg = str(info.value)
    for name in (str(path),) + names:
        assert name in msg, f"{name!r} not in error {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------
# safetensors round trip
# ------------------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = sample_tensors()
    modelio.write_safetensors(path, tensors, {"format": "polysketch", "n": 3})
    got, meta = modelio.read_safetensors(path)
    assert meta == {"format": "polysketch", "n": "3"}
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert torch.equal(bits(got[name]), bits(want)), name


def test_safetensors_layout(tmp_path: Path) -> None:
    """Little-endian length, 8-byte aligned data section and tensors, sorted names, standard
    dtype names (so other safetensors readers accept our files)."""
    path = tmp_path / "t.safetensors"
    tensors = sample_tensors()
    modelio.write_safetensors(path, tensors)
    data = path.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    assert hlen % 8 == 0
    header, body = split_file(path)
    assert "__metadata__" not in header
    assert list(header) == sorted(tensors)
    names = {"f32": "F32", "f16": "F16", "bf16": "BF16", "i32": "I32", "f64": "F64", "i64": "I64",
             "u8": "U8"}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        assert begin % 8 == 0 and end <= len(body)
        assert info["shape"] == list(tensors[name].shape)
        if name in names:
            assert info["dtype"] == names[name]
    assert body[slice(*header["f32"]["data_offsets"])] == struct.pack(
        "<15f", *tensors["f32"].flatten().tolist())


def test_safetensors_refuses_unstorable_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensor flags"):
        modelio.write_safetensors(tmp_path / "t.safetensors", {"flags": torch.ones(2).bool()})


# ------------------------------------------------------------------------------------------------
# header validation: every error names the file, and the tensor where there is one
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.safetensors"
    modelio.write_safetensors(path, {"alpha": torch.randn(2, 3), "beta": torch.arange(5).int()})
    return path


def test_truncated_file(valid_file: Path) -> None:
    data = valid_file.read_bytes()
    header, _ = split_file(valid_file)
    hlen = int.from_bytes(data[:8], "little")
    data_start = 8 + hlen
    beta_end = data_start + header["beta"]["data_offsets"][1]
    cut_path = valid_file.with_name("cut.safetensors")
    for cut in (0, 1, 7, 8, 9, data_start // 2, data_start - 1):  # inside the length or header
        cut_path.write_bytes(data[:cut])
        expect_error(cut_path)
    for cut in (data_start, data_start + 1, beta_end - 1):  # inside the data section
        cut_path.write_bytes(data[:cut])
        expect_error(cut_path, "tensor ")
    cut_path.write_bytes(data[:beta_end - 1])
    expect_error(cut_path, "tensor beta")  # alpha is whole, beta lost its last byte


@pytest.mark.parametrize("hlen", [10**6, 2**40, 2**64 - 1])
def test_header_length_beyond_file(valid_file: Path, hlen: int) -> None:
    data = bytearray(valid_file.read_bytes())
    data[:8] = struct.pack("<Q", hlen)
    valid_file.write_bytes(bytes(data))
    expect_error(valid_file, str(hlen))


@pytest.mark.parametrize("header", [b"{not json}", b"\xff\xfe{}", b"", b"[1, 2]", b"\"x\"",
                                    b"{\"a\": 1"])
def test_header_not_a_json_object(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, b"\0" * 16)
    expect_error(path)


def entry(dtype: str, shape: Any, offsets: Any) -> Dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("bad", [
    pytest.param(entry("F32", [2, 3], [0, 28]), id="end-beyond-data"),
    pytest.param(entry("F32", [2, 3], [8, 32]), id="range-beyond-data"),
    pytest.param(entry("F32", [2, 3], [-4, 20]), id="negative-begin"),
    pytest.param(entry("F32", [2, 3], [24, 0]), id="end-before-begin"),
    pytest.param(entry("F32", [2, 4], [0, 24]), id="shape-larger-than-range"),
    pytest.param(entry("F32", [2, 2], [0, 24]), id="shape-smaller-than-range"),
    pytest.param(entry("F16", [2, 3], [0, 24]), id="dtype-size-mismatch"),
    pytest.param(entry("F32", [-2, -3], [0, 24]), id="negative-dims"),
    pytest.param(entry("F8", [2, 3], [0, 24]), id="unknown-dtype"),
    pytest.param(entry("F32", 6, [0, 24]), id="shape-not-a-list"),
    pytest.param(entry("F32", [2, 3], [0]), id="one-offset"),
    pytest.param(entry("F32", [2, 3], None), id="no-offsets"),
    pytest.param({"dtype": "F32", "shape": [2, 3]}, id="missing-offsets-key"),
    pytest.param("F32", id="entry-not-an-object"),
    pytest.param(entry("F32", [2.5, 3], [0, 24]), id="float-dim"),
    pytest.param(entry("F32", [True, 6], [0, 24]), id="bool-dim"),
    pytest.param(entry("F32", [2, 3], ["0", "24"]), id="string-offsets"),
    pytest.param(entry("F32", [2**32, 2**32], [0, 0]), id="element-count-overflow"),
])
def test_bad_tensor_entry(tmp_path: Path, bad: Any) -> None:
    path = tmp_path / "bad.safetensors"
    good = entry("F32", [2], [0, 8])
    write_raw(path, {"__metadata__": {"format": "polysketch"}, "ok": good, "w.bad": bad},
              b"\0" * 24)
    expect_error(path, "tensor w.bad")


def test_overlap_hidden_behind_an_empty_tensor(tmp_path: Path) -> None:
    """a: [0, 16), empty at 8, b: [8, 24): overlap with a, though not with its sorted neighbour."""
    path = tmp_path / "overlap.safetensors"
    write_raw(path, {"a": entry("F32", [4], [0, 16]), "e": entry("F32", [0], [8, 8]),
                     "b": entry("F32", [4], [8, 24])}, b"\0" * 24)
    expect_error(path, "overlap", "a", "b")


# ------------------------------------------------------------------------------------------------
# whole model directories
# ------------------------------------------------------------------------------------------------
MIXED_LAYERS = [
    {"kind": "polysketch", "sketch": "random", "sketch_size": 4, "local_exact": True,
     "block_size": 3},
    {"kind": "polysketch", "sketch": "learned", "sketch_size": 4},
    {"kind": "polynomial"},
    {"kind": "sparse_fixed", "chunk": 4, "summary": 1},
]


@pytest.fixture
def saved(tmp_path: Path):
    """(float32 model, its directory) for a model that has every kind of tensor."""
    model = make_model(MIXED_LAYERS).float()
    out = tmp_path / "m"
    modelio.save_model_dir(model, out)
    return model, out


def test_model_round_trip_f32_is_exact(saved) -> None:
    model, out = saved
    loaded = modelio.load_model_dir(out)
    tokens = make_tokens(2, 13)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tensors, meta = modelio.read_safetensors(out / "model.safetensors")
    assert meta == {"format": "polysketch", "format_version": "1"}
    assert torch.equal(tensors["blocks.0.attn.sketch.s1"], model.blocks[0].attn.sketch.s1)
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == 1 and config["torch_dtype"] == "f32"
    assert [layer["kind"] for layer in config["layers"]] == [x["kind"] for x in MIXED_LAYERS]
    assert config["layers"][1]["local_exact"] is False  # always written for polysketch


@pytest.mark.parametrize("storage,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_model_round_trip_low_precision(tmp_path: Path, storage: str, dtype: torch.dtype) -> None:
    model = make_model(MIXED_LAYERS).float()
    modelio.save_model_dir(model, tmp_path / "m", storage=storage)
    tensors, _ = modelio.read_safetensors(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {dtype}
    loaded = modelio.load_model_dir(tmp_path / "m", dtype=torch.float64)
    for name, t in model.state_dict().items():  # exactly the stored rounding, widened
        assert torch.equal(loaded.state_dict()[name], t.to(dtype).double()), name


def test_save_refuses_unknown_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="f8"):
        modelio.save_model_dir(make_model([{"kind": "softmax"}]), tmp_path / "m", storage="f8")


def rewrite_tensors(out: Path, edit: Callable[[Dict[str, torch.Tensor]], None]) -> Path:
    path = out / "model.safetensors"
    tensors, meta = modelio.read_safetensors(path)
    edit(tensors)
    modelio.write_safetensors(path, tensors, meta)
    return path


def load(out: Path) -> Callable[[Path], Any]:
    return lambda _: modelio.load_model_dir(out)


def test_missing_tensor(saved) -> None:
    _, out = saved
    path = rewrite_tensors(out, lambda t: t.pop("blocks.1.attn.sketch.f2.1.up.weight"))
    expect_error(path, "blocks.1.attn.sketch.f2.1.up.weight", call=load(out))


def test_unexpected_tensor(saved) -> None:
    _, out = saved
    path = rewrite_tensors(out, lambda t: t.update({"blocks.3.attn.qk_norm.weight": t[
        "blocks.2.attn.qk_norm.weight"]}))
    expect_error(path, "blocks.3.attn.qk_norm.weight", call=load(out))


def test_wrong_shape_for_config(saved) -> None:
    _, out = saved
    path = rewrite_tensors(out, lambda t: t.update(
        {"blocks.0.attn.sketch.s2": torch.zeros(8, 5)}))
    expect_error(path, "blocks.0.attn.sketch.s2", "[8, 5]", call=load(out))


def test_integer_weight(saved) -> None:
    _, out = saved
    path = rewrite_tensors(out, lambda t: t.update({"logit_bias": t["logit_bias"].int()}))
    expect_error(path, "logit_bias", call=load(out))


def test_corrupt_weights_file_in_model_dir(saved) -> None:
    _, out = saved
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-9])
    expect_error(path, "tensor ", call=load(out))


def edit_config(out: Path, edit: Callable[[Dict[str, Any]], None]) -> Path:
    path = out / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("edit,names", [
    pytest.param(lambda c: c.update(dropout=0.1), ["dropout"], id="unknown-key"),
    pytest.param(lambda c: c["layers"][3].update(kind="linear"), ["layers[3]", "'linear'"],
                 id="bad-attention-kind"),
    pytest.param(lambda c: c["layers"][0].update(color="red"), ["color"],
                 id="unknown-attention-key"),
    pytest.param(lambda c: c.update(format_version=2), ["format_version"], id="format-version"),
    pytest.param(lambda c: c.update(tokenizer={"type": "bpe"}), ["tokenizer"], id="tokenizer"),
    pytest.param(lambda c: c.update(n_layers=3), ["n_layers=3"], id="layer-count"),
    pytest.param(lambda c: c.update(n_heads=3), ["d_model", "n_heads"], id="width"),
    pytest.param(lambda c: c.pop("d_model"), ["d_model"], id="missing-d-model"),
    pytest.param(lambda c: c.update(attention=c.pop("layers")[0]), ["attention", "layers"],
                 id="attention-shorthand"),
])
def test_bad_config(saved, edit: Callable[[Dict[str, Any]], None], names) -> None:
    _, out = saved
    path = edit_config(out, edit)
    expect_error(path, *names, call=load(out))


def test_extra_config_keys_are_ignored(saved) -> None:
    model, out = saved
    edit_config(out, lambda c: c.update(training={"steps": 3}))
    loaded = modelio.load_model_dir(out)
    tokens = make_tokens(1, 5)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_config_not_json_or_missing(saved) -> None:
    _, out = saved
    path = out / "config.json"
    path.write_text("{\"d_model\": ")
    expect_error(path, call=load(out))
    path.unlink()
    expect_error(path, "not found", call=load(out))
