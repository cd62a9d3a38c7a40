"""Dense forward == block prefill == recurrent decode, for every attention kind (algorithm.md
sections 3 and 4: "decode after prefill must give the same outputs as prefill over the whole
sequence"). Everything runs in float64 on tiny models, batch 2, at lengths that are not multiples
of the block, with chunk boundaries that are not aligned to blocks."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch

from helpers import assert_close, decode, dense, make_model, make_tokens, prefill

R = 4  # sketch size: tiny, the algebra does not depend on it

# block size -> (short length 2b+1, long length, prefill length before decoding). The long length
# is not a multiple of b and decoding from the prefill length crosses at least three boundaries.
LENGTHS = {1: (3, 12, 5), 3: (7, 14, 5), 64: (129, 200, 60)}
# Prefill chunk sizes summing to the long length; no cumulative end is a multiple of b (b > 1),
# and some chunks span two block boundaries.
CHUNKS = {1: [2, 5, 1, 4], 3: [2, 5, 1, 5, 1], 64: [37, 1, 50, 13, 64, 35]}

SKETCHES = [
    pytest.param("random", False, id="random"),
    pytest.param("random", True, id="random-local"),
    pytest.param("learned", False, id="learned"),
    pytest.param("learned", True, id="learned-local"),
]
BLOCKS = [1, 3, 64]

KV_LAYERS: Dict[str, Dict[str, Any]] = {
    "softmax": {"kind": "softmax"},
    "polynomial": {"kind": "polynomial"},
    "sliding_window": {"kind": "sliding_window", "window": 5},
    "sparse_strided": {"kind": "sparse_strided", "window": 3, "stride": 4},
    "sparse_fixed": {"kind": "sparse_fixed", "chunk": 5, "summary": 2},
}
KV_N = 23  # crosses several windows, strides and chunks of the layers above
KV_PREFILL = 6
KV_CHUNKS = [4, 7, 1, 6, 5]


def sketch_layer(sketch: str, local: bool, b: int) -> Dict[str, Any]:
    layer: Dict[str, Any] = {"kind": "polysketch", "sketch": sketch, "sketch_size": R,
                             "local_exact": local}
    if local:
        layer["block_size"] = b  # local_exact: the model's own blocks
    return layer


def sketch_model(sketch: str, local: bool, b: int):
    """Returns (2-layer model, block_size to pass to prefill: None for local_exact, else b)."""
    model = make_model([sketch_layer(sketch, local, b)] * 2, seed=b)
    return model, (None if local else b)


# ------------------------------------------------------------------------------------------------
# polysketch: random / learned, with and without local_exact, b in {1, 3, 64}
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("sketch,local", SKETCHES)
def test_sketch_prefill_matches_dense(sketch: str, local: bool, b: int) -> None:
    model, pb = sketch_model(sketch, local, b)
    for n in LENGTHS[b][:2]:
        tokens = make_tokens(2, n)
        logits, _ = prefill(model, tokens, block_size=pb)
        assert_close(logits, dense(model, tokens), f"prefill vs dense, n={n}")


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("sketch,local", SKETCHES)
def test_sketch_decode_from_start_matches_dense(sketch: str, local: bool, b: int) -> None:
    model, _ = sketch_model(sketch, local, b)
    tokens = make_tokens(2, LENGTHS[b][1])
    logits = decode(model, tokens, model.init_state(2), 0)
    assert_close(logits, dense(model, tokens), "decode from position 0 vs dense")


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("sketch,local", SKETCHES)
def test_sketch_decode_after_prefill_matches_dense(sketch: str, local: bool, b: int) -> None:
    model, pb = sketch_model(sketch, local, b)
    _, n, p = LENGTHS[b]
    tokens = make_tokens(2, n)
    ref = dense(model, tokens)
    head, states = prefill(model, tokens[:, :p], block_size=pb)
    tail = decode(model, tokens, states, p)
    assert_close(head, ref[:, :p], "prefill part")
    assert_close(tail, ref[:, p:], f"decode from {p} to {n}")


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("sketch,local", SKETCHES)
def test_sketch_chunked_prefill_matches_single(sketch: str, local: bool, b: int) -> None:
    model, pb = sketch_model(sketch, local, b)
    n = LENGTHS[b][1]
    tokens = make_tokens(2, n + 4)  # 4 decode steps after the chunked prefill
    single, _ = prefill(model, tokens[:, :n], block_size=pb)
    chunked, states = prefill(model, tokens[:, :n], CHUNKS[b], block_size=pb)
    tail = decode(model, tokens, states, n)
    assert_close(chunked, single, f"chunks {CHUNKS[b]} vs one prefill")
    assert_close(tail, dense(model, tokens)[:, n:], "decode after chunked prefill vs dense")


@pytest.mark.parametrize("chunk", [1, 5, 64, 500])
def test_prefill_chunked_matches_single(chunk: int) -> None:
    """The scripts' entry point (eval, generate, golden): equal chunks from any start position,
    here a local_exact model with b = 3 so chunks of 5 straddle block boundaries."""
    model, _ = sketch_model("learned", True, 3)
    tokens = make_tokens(2, 23)
    single, _ = prefill(model, tokens)
    with torch.no_grad():
        head = model.prefill_chunked(tokens[:, :4], model.init_state(2), chunk)
        states = model.init_state(2)
        model.prefill(tokens[:, :4], states, 0)
        tail = model.prefill_chunked(tokens[:, 4:], states, chunk, start=4)
    assert_close(head, single[:, :4], f"prefill_chunked({chunk}) of the first 4 tokens")
    assert_close(tail, single[:, 4:], f"prefill_chunked({chunk}) from position 4")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        model.prefill_chunked(tokens, model.init_state(2), 0)


@pytest.mark.parametrize("sketch", ["random", "learned"])
def test_plain_sketch_prefill_any_block_size(sketch: str) -> None:
    """Without local_exact the block size only changes rounding (algorithm.md section 3)."""
    model, _ = sketch_model(sketch, False, 3)
    tokens = make_tokens(2, 20)
    ref = dense(model, tokens)
    for pb in (1, 2, 7, 19, 20, 64, None):
        logits, _ = prefill(model, tokens, [9, 11], block_size=pb)
        assert_close(logits, ref, f"prefill block_size={pb}")


@pytest.mark.parametrize("sketch", ["random", "learned"])
def test_local_exact_prefill_refuses_other_block_size(sketch: str) -> None:
    model, _ = sketch_model(sketch, True, 3)
    tokens = make_tokens(1, 5)
    with pytest.raises(ValueError, match="block size 3"):
        prefill(model, tokens, block_size=4)
    prefill(model, tokens, block_size=3)  # the model's own size is accepted


@pytest.mark.parametrize("sketch", ["random", "learned"])
def test_local_exact_block_size_changes_logits(sketch: str) -> None:
    """The tolerances can fail: the same weights with blocks of 4 instead of 3 (or with the exact
    local part switched off) move the logits far beyond ATOL/RTOL."""
    model3, _ = sketch_model(sketch, True, 3)
    tokens = make_tokens(2, 14)
    ref = dense(model3, tokens)
    for layer in (sketch_layer(sketch, True, 4), sketch_layer(sketch, False, 3)):
        other = make_model([layer] * 2)
        other.load_state_dict(model3.state_dict(), strict=False)
        diff = (dense(other, tokens) - ref).abs().max().item()
        assert diff > 1e-4, f"{layer}: logits moved by only {diff}"


# ------------------------------------------------------------------------------------------------
# KV-cache kinds: softmax, polynomial, sliding_window, sparse_strided, sparse_fixed
# ------------------------------------------------------------------------------------------------
def kv_model(kind: str):
    return make_model([KV_LAYERS[kind]] * 2, seed=7)


@pytest.mark.parametrize("kind", list(KV_LAYERS))
def test_kv_prefill_matches_dense(kind: str) -> None:
    model = kv_model(kind)
    tokens = make_tokens(2, KV_N)
    logits, _ = prefill(model, tokens)
    assert_close(logits, dense(model, tokens), "prefill vs dense")


@pytest.mark.parametrize("kind", list(KV_LAYERS))
def test_kv_decode_from_start_matches_dense(kind: str) -> None:
    model = kv_model(kind)
    tokens = make_tokens(2, KV_N)
    logits = decode(model, tokens, model.init_state(2), 0)
    assert_close(logits, dense(model, tokens), "decode from position 0 vs dense")


@pytest.mark.parametrize("kind", list(KV_LAYERS))
def test_kv_decode_after_prefill_matches_dense(kind: str) -> None:
    model = kv_model(kind)
    tokens = make_tokens(2, KV_N)
    head, states = prefill(model, tokens[:, :KV_PREFILL])
    tail = decode(model, tokens, states, KV_PREFILL)
    ref = dense(model, tokens)
    assert_close(head, ref[:, :KV_PREFILL], "prefill part")
    assert_close(tail, ref[:, KV_PREFILL:], "decode after prefill")


@pytest.mark.parametrize("kind", list(KV_LAYERS))
def test_kv_chunked_prefill_matches_single(kind: str) -> None:
    model = kv_model(kind)
    tokens = make_tokens(2, KV_N + 4)
    single, _ = prefill(model, tokens[:, :KV_N])
    chunked, states = prefill(model, tokens[:, :KV_N], KV_CHUNKS)
    tail = decode(model, tokens, states, KV_N)
    assert_close(chunked, single, f"chunks {KV_CHUNKS} vs one prefill")
    assert_close(tail, dense(model, tokens)[:, KV_N:], "decode after chunked prefill vs dense")


# ------------------------------------------------------------------------------------------------
# Batch rows are independent in every form
# ------------------------------------------------------------------------------------------------
ALL_LAYERS: List[Any] = [
    pytest.param(sketch_layer(s, loc, 3), id=f"polysketch-{s}{'-local' if loc else ''}")
    for s in ("random", "learned") for loc in (False, True)
] + [pytest.param(layer, id=kind) for kind, layer in KV_LAYERS.items()]


def all_forms(model, tokens: torch.Tensor, p: int, chunks: Optional[List[int]]) -> torch.Tensor:
    """Dense, chunked prefill of p tokens + decode of the rest, stacked: [3, B, n, V]."""
    head, states = prefill(model, tokens[:, :p], chunks)
    tail = decode(model, tokens, states, p)
    full, _ = prefill(model, tokens)
    return torch.stack([dense(model, tokens), full, torch.cat([head, tail], dim=1)])


@pytest.mark.parametrize("layer", ALL_LAYERS)
def test_batch_rows_are_independent(layer: Dict[str, Any]) -> None:
    model = make_model([layer] * 2, seed=3)
    tokens = make_tokens(2, 11)
    tokens[1, :4] = tokens[0, :4]  # a shared prefix must not make the rows interact either
    both = all_forms(model, tokens, 4, [1, 3])
    for row in range(2):
        alone = all_forms(model, tokens[row:row + 1], 4, [1, 3])
        assert_close(both[:, row:row + 1], alone, f"batch row {row} vs run alone")
    assert_close(both[1], both[0], "prefill vs dense")
    assert_close(both[2], both[0], "chunked prefill + decode vs dense")


# ------------------------------------------------------------------------------------------------
# Every position encoding keeps the three forms equal (RoPE only on the local block under
# "local_rope": the sketched state and the KV caches then hold keys without rotation)
# ------------------------------------------------------------------------------------------------
MIXED_LAYERS = [sketch_layer("learned", True, 3), {"kind": "softmax"},
                sketch_layer("random", False, 3), {"kind": "sparse_fixed", "chunk": 5, "summary": 2}]


@pytest.mark.parametrize("mode", ["sinusoidal+rope", "rope", "local_rope"])
def test_position_encodings_keep_forms_equal(mode: str) -> None:
    model = make_model(MIXED_LAYERS, seed=7, position_encoding=mode)
    tokens = make_tokens(2, 14)
    forms = all_forms(model, tokens, 5, [2, 1, 2])
    assert_close(forms[1], forms[0], f"{mode}: prefill vs dense")
    assert_close(forms[2], forms[0], f"{mode}: chunked prefill + decode vs dense")


def test_position_encodings_differ() -> None:
    """Each mode computes something else from the same weights (so none is silently ignored),
    and the default is what a config without the key computes."""
    tokens = make_tokens(1, 12)
    outs = {}
    for mode in (None, "sinusoidal+rope", "rope", "local_rope"):
        outs[mode] = dense(make_model(MIXED_LAYERS, seed=7, position_encoding=mode), tokens)
    assert torch.equal(outs[None], outs["sinusoidal+rope"])
    modes = ["sinusoidal+rope", "rope", "local_rope"]
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, f"{a} and {b} agree"


def test_local_rope_is_position_free_outside_the_block() -> None:
    """Under "local_rope" a model without local_exact layers sees no position at all: shifting
    the start position of a prefill changes nothing."""
    model = make_model([{"kind": "softmax"}, sketch_layer("random", False, 3)], seed=2,
                       position_encoding="local_rope")
    tokens = make_tokens(1, 9)
    a = model.prefill(tokens, model.init_state(1), start=0)
    b = model.prefill(tokens, model.init_state(1), start=1000)
    assert_close(b, a, "start 1000 vs start 0")
