"""Model directories on disk: config.json + model.safetensors (format: docs/model-format.md).

A small, dependency-free safetensors reader and writer (8-byte little-endian header length, JSON
header, raw little-endian tensors), and load/save of a whole model directory. The reader checks
everything the C++ loader checks, so a file that passes here is one the engine accepts.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from model import ModelConfig, PolySketchFormer

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "U8": (torch.uint8, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in DTYPES.items()}
STORAGE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits as int16
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()


def write_safetensors(path: Path, tensors: Dict[str, torch.Tensor],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes tensors in sorted name order, each offset aligned to 8 bytes by header padding."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in TORCH_TO_ST:
            raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored")
        raw = _raw_bytes(t)
        header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
        pad = (-offset) % 8  # keep every tensor 8-byte aligned for mmap readers
        if pad:
            blobs.append(b"\0" * pad)
            offset += pad
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)  # data section starts 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    tmp.replace(path)


def read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads and validates a safetensors file. Raises ValueError naming the file and tensor."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(data):
        raise ValueError(f"{path}: header length {hlen} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    body = memoryview(data)[8 + hlen:]
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    out: Dict[str, torch.Tensor] = {}
    ranges = []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name}: bad header entry or dtype ({info!r})")
        dtype, size = DTYPES[info["dtype"]]
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise ValueError(f"{path}: tensor {name}: shape and data_offsets must be lists of "
                             f"integers, got {shape!r} and {offsets!r}")
        begin, end = offsets
        if any(s < 0 for s in shape):
            raise ValueError(f"{path}: tensor {name}: negative dimension in {shape}")
        nbytes = math.prod(shape) * size  # Python ints: no overflow
        if not (0 <= begin <= end <= len(body)) or end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name}: offsets [{begin}, {end}) do not hold "
                             f"{shape} {info['dtype']} within {len(body)} data bytes")
        ranges.append((begin, end, name))
        raw = bytes(body[begin:end])
        if dtype == torch.bfloat16:
            t = torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16)
        else:
            npdt = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
            t = torch.from_numpy(np.frombuffer(raw, dtype=npdt).astype(npdt.newbyteorder("=")))
        out[name] = t.reshape(shape)
    ranges.sort()
    reach, reach_name = 0, ""  # furthest end so far among non-empty tensors, and whose it is
    for begin, end, name in ranges:
        if begin == end:
            continue  # an empty tensor holds no bytes and overlaps nothing
        if begin < reach:
            raise ValueError(f"{path}: tensors {reach_name} and {name} overlap in the data "
                             "section")
        reach, reach_name = end, name
    return out, meta


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def save_model_dir(model: PolySketchFormer, out_dir: Path, storage: str = "f32",
                   extra_config: Optional[Dict[str, Any]] = None) -> None:
    """Writes config.json and model.safetensors. Random sketch matrices are stored like weights."""
    if storage not in STORAGE:
        raise ValueError(f"storage dtype {storage!r} is not one of {sorted(STORAGE)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_json()
    config["format_version"] = FORMAT_VERSION
    config["tokenizer"] = {"type": "bytes"}
    config["torch_dtype"] = storage
    if extra_config:
        config.update(extra_config)
    tensors = {k: v.detach().to(STORAGE[storage]) for k, v in model.state_dict().items()}
    write_safetensors(out_dir / "model.safetensors", tensors,
                      {"format": "polysketch", "format_version": str(FORMAT_VERSION)})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


CONFIG_EXTRA_KEYS = ("format_version", "tokenizer", "torch_dtype", "training")


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    version = obj.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is not {FORMAT_VERSION}")
    tok = obj.get("tokenizer", {"type": "bytes"})
    if tok != {"type": "bytes"}:
        raise ValueError(f"{path}: tokenizer {tok} is not supported (only bytes)")
    if "attention" in obj:
        raise ValueError(f"{path}: a model directory lists every layer under 'layers'; the "
                         "'attention' shorthand is for training configs only")
    for key in CONFIG_EXTRA_KEYS:
        obj.pop(key, None)
    try:
        return ModelConfig.from_json(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_model_dir(model_dir: Path, dtype: torch.dtype = torch.float32) -> PolySketchFormer:
    """Loads a model directory; every tensor must be present with the config's shape."""
    cfg = load_config(model_dir)
    model = PolySketchFormer(cfg)
    path = Path(model_dir) / "model.safetensors"
    tensors, _ = read_safetensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, ref in expected.items():
        if list(tensors[name].shape) != list(ref.shape):
            raise ValueError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, "
                             f"config wants {list(ref.shape)}")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{path}: tensor {name} is not floating point")
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    model.eval()
    return model.to(dtype)
