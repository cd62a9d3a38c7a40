"""ModelConfig.from_json: what a config may say (docs/model-format.md, config.json), and models that
mix attention kinds across layers running end to end."""
from __future__ import annotations

import copy
from typing import Any, Dict

import pytest

from helpers import assert_close, decode, dense, make_tokens, prefill, roughen
from model import AttentionConfig, ModelConfig, PolySketchFormer

BASE: Dict[str, Any] = {
    "architecture": "polysketchformer",
    "vocab_size": 32,
    "d_model": 16,
    "n_layers": 3,
    "n_heads": 2,
    "max_seq_len": 64,
    "attention": {"kind": "softmax"},
}
POLYSKETCH = {"kind": "polysketch", "sketch": "learned", "sketch_size": 4, "local_exact": True,
              "block_size": 3}
MIXED = [POLYSKETCH, {"kind": "softmax"}, {"kind": "sparse_fixed", "chunk": 4, "summary": 1}]


def config(**changes: Any) -> Dict[str, Any]:
    """BASE with keys replaced (a value of None removes the key)."""
    obj = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def refused(obj: Dict[str, Any], *names: str) -> str:
    """Asserts from_json refuses obj with a ValueError naming every one of names."""
    with pytest.raises(ValueError) as info:
        ModelConfig.from_json(obj)
    msg = str(info.value)
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


def test_attention_default_is_copied_to_every_layer() -> None:
    attn = {"kind": "sparse_strided", "window": 3, "stride": 2}
    cfg = ModelConfig.from_json(config(attention=attn))
    assert len(cfg.layers) == 3
    assert all(layer == AttentionConfig(**attn) for layer in cfg.layers)
    assert len({id(layer) for layer in cfg.layers}) == 3  # copies, not one shared object
    assert cfg.to_json()["layers"] == [attn] * 3


def test_defaults_and_round_trip() -> None:
    cfg = ModelConfig.from_json(config(attention=None, layers=MIXED, d_model=48))
    assert cfg.d_ff == 128  # floor(8 * 48 / 3 / 8) * 8
    assert cfg.norm_eps == 1e-5
    assert cfg.head_dim == 24
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.to_json()["layers"][0]["local_exact"] is True


def test_stored_d_ff_is_used() -> None:
    assert ModelConfig.from_json(config(d_ff=24)).d_ff == 24


@pytest.mark.parametrize("key", ["dropout", "bias", "attention_kind"])
def test_unknown_top_level_key(key: str) -> None:
    refused(config(**{key: 1}), key)


def test_unknown_attention_key() -> None:
    refused(config(attention={"kind": "softmax", "temperature": 2}), "temperature")
    refused(config(attention=None, layers=[{"kind": "softmax"}, {"kind": "softmax", "w": 1},
                                           {"kind": "softmax"}]), "'w'")


SIZE_CASES = [
    pytest.param(key, value, id=f"{key}={value!r}")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff")
    for value in (0, -2, 1.5, "8")
]


@pytest.mark.parametrize("key,value", SIZE_CASES)
def test_non_positive_or_non_integer_sizes(key: str, value: Any) -> None:
    refused(config(**{key: value}), key)


@pytest.mark.parametrize("attn,name", [
    ({"kind": "polysketch", "sketch": "random", "sketch_size": 0}, "sketch_size"),
    ({"kind": "polysketch", "sketch": "random", "sketch_size": 4, "block_size": -1},
     "block_size"),
    ({"kind": "sliding_window", "window": 0}, "window"),
    ({"kind": "sliding_window", "window": 2.0}, "window"),
    ({"kind": "sliding_window", "window": True}, "window"),
    ({"kind": "sparse_strided", "window": 3, "stride": 0}, "stride"),
    ({"kind": "sparse_strided", "window": 3}, "stride"),
    ({"kind": "sparse_fixed", "chunk": 0, "summary": 1}, "chunk"),
    ({"kind": "sparse_fixed", "chunk": 4, "summary": 0}, "summary"),
    ({"kind": "sparse_fixed", "chunk": 4, "summary": 5}, "summary"),
])
def test_bad_attention_values(attn: Dict[str, Any], name: str) -> None:
    refused(config(attention=attn), name, "layers[0]")


@pytest.mark.parametrize("attn,name", [
    ({"kind": "softmax", "window": 4}, "window"),
    ({"kind": "polynomial", "sketch_size": 4}, "sketch_size"),
    ({"kind": "softmax", "local_exact": True}, "local_exact"),
    ({"kind": "sliding_window", "window": 4, "stride": 2}, "stride"),
    ({"kind": "sparse_fixed", "chunk": 4, "summary": 1, "window": 4}, "window"),
    ({"kind": "polysketch", "sketch": "random", "sketch_size": 4, "chunk": 4}, "chunk"),
    ({"kind": "sparse_strided", "window": 4, "stride": 2, "block_size": 3}, "block_size"),
])
def test_keys_that_do_not_apply_to_the_kind(attn: Dict[str, Any], name: str) -> None:
    refused(config(attention=attn), name, repr(attn["kind"]))


@pytest.mark.parametrize("attn,name", [
    ({"kind": "linear"}, "'linear'"),
    ({"kind": "polysketch", "sketch_size": 4}, "sketch"),
    ({"kind": "polysketch", "sketch": "gaussian", "sketch_size": 4}, "'gaussian'"),
    ({"kind": "polysketch", "sketch": "random"}, "sketch_size"),
])
def test_bad_kind_or_sketch(attn: Dict[str, Any], name: str) -> None:
    refused(config(attention=attn), name)


@pytest.mark.parametrize("sketch", ["random", "learned"])
def test_local_exact_needs_block_size(sketch: str) -> None:
    attn = {"kind": "polysketch", "sketch": sketch, "sketch_size": 4, "local_exact": True}
    refused(config(attention=attn), "block_size")
    ModelConfig.from_json(config(attention=dict(attn, block_size=8)))  # with it: fine
    ModelConfig.from_json(config(attention=dict(attn, local_exact=False)))  # plain: optional


def test_width_not_divisible_by_heads() -> None:
    refused(config(d_model=16, n_heads=3), "d_model", "n_heads")


def test_odd_head_width() -> None:
    refused(config(d_model=18, n_heads=2), "even")


def test_layer_count_must_match() -> None:
    refused(config(attention=None, layers=MIXED[:2]), "n_layers=3")


def test_needs_layers_or_attention() -> None:
    refused(config(attention=None), "layers")


def test_architecture() -> None:
    refused(config(architecture="gpt2"), "gpt2")


@pytest.mark.parametrize("changes", [
    pytest.param({"d_model": None}, id="missing-d-model"),
    pytest.param({"n_heads": True}, id="bool-n-heads"),
    pytest.param({"norm_eps": "1e-5"}, id="string-norm-eps"),
    pytest.param({"attention": dict(POLYSKETCH, local_exact="no")}, id="string-local-exact"),
    pytest.param({"layers": MIXED}, id="both-layers-and-attention"),
])
def test_refused_configs(changes: Dict[str, Any]) -> None:
    """Configs the format page says a loader must refuse (missing keys, bools as integers,
    unchecked norm_eps, a non-bool local_exact, both `layers` and `attention`)."""
    refused(config(**changes))


# ------------------------------------------------------------------------------------------------
# A model mixing kinds across layers
# ------------------------------------------------------------------------------------------------
def test_mixed_layers_dense_prefill_decode() -> None:
    cfg = ModelConfig.from_json(config(attention=None, layers=MIXED))
    assert [layer.kind for layer in cfg.layers] == ["polysketch", "softmax", "sparse_fixed"]
    model = PolySketchFormer(cfg)
    roughen(model, seed=2)
    model = model.double().eval()
    tokens = make_tokens(2, 17)
    ref = dense(model, tokens)
    whole, _ = prefill(model, tokens)
    assert_close(whole, ref, "one prefill vs dense")
    head, states = prefill(model, tokens[:, :8], [2, 5, 1])
    tail = decode(model, tokens, states, 8)
    assert_close(head, ref[:, :8], "chunked prefill vs dense")
    assert_close(tail, ref[:, 8:], "decode after prefill vs dense")
    kinds = [type(st).__name__ for st in states]
    assert kinds == ["SketchState", "KVState", "KVState"]


@pytest.mark.parametrize("value", ["alibi", "", 3, None])
def test_bad_position_encoding(value: Any) -> None:
    obj = config()
    obj["position_encoding"] = value
    refused(obj, "position_encoding")


@pytest.mark.parametrize("mode", ["rope", "local_rope"])
def test_position_encoding_round_trip(mode: str) -> None:
    cfg = ModelConfig.from_json(config(position_encoding=mode))
    assert cfg.position_encoding == mode
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_default_position_encoding_is_not_written() -> None:
    """Configs made before the key existed export byte for byte as they were."""
    cfg = ModelConfig.from_json(config())
    assert cfg.position_encoding == "sinusoidal+rope"
    assert "position_encoding" not in cfg.to_json()
