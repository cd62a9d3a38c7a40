"""Masks, decode-state sizes and the exact polynomial weights against brute-force definitions
(algorithm.md section 2 and docs/model-format.md, "A layer's attention object")."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch

import model as M
from helpers import assert_close, decode, make_model, make_tokens, prefill


def brute_allowed(layer: Dict[str, Any], i: int, j: int) -> bool:
    """The documented visibility of key j to query i, one pair at a time."""
    if j > i:
        return False
    kind = layer["kind"]
    if kind == "sliding_window":
        return i - j < layer["window"]
    if kind == "sparse_strided":
        return i - j < layer["window"] or (i - j) % layer["stride"] == 0
    if kind == "sparse_fixed":
        c, summary = layer["chunk"], layer["summary"]
        return i // c == j // c or j % c >= c - summary
    return True  # softmax, polynomial, polysketch: causal only


MASK_LAYERS: List[Dict[str, Any]] = [
    {"kind": "sliding_window", "window": 1},
    {"kind": "sliding_window", "window": 4},
    {"kind": "sliding_window", "window": 100},
    {"kind": "sparse_strided", "window": 3, "stride": 4},
    {"kind": "sparse_strided", "window": 1, "stride": 1},
    {"kind": "sparse_strided", "window": 5, "stride": 2},
    {"kind": "sparse_strided", "window": 2, "stride": 7},
    {"kind": "sparse_fixed", "chunk": 5, "summary": 2},
    {"kind": "sparse_fixed", "chunk": 4, "summary": 4},
    {"kind": "sparse_fixed", "chunk": 1, "summary": 1},
    {"kind": "sparse_fixed", "chunk": 6, "summary": 1},
    {"kind": "softmax"},
    {"kind": "polynomial"},
    {"kind": "polysketch", "sketch": "random", "sketch_size": 4},
]


def layer_id(layer: Dict[str, Any]) -> str:
    return "-".join(str(v) for v in layer.values())


@pytest.mark.parametrize("layer", MASK_LAYERS, ids=layer_id)
def test_allowed_matches_brute_force(layer: Dict[str, Any]) -> None:
    cfg = M.AttentionConfig.from_json(layer)
    n = 40
    pos = torch.arange(n)
    got = M.allowed(cfg, pos[:, None], pos[None, :])
    want = torch.tensor([[brute_allowed(layer, i, j) for j in range(n)] for i in range(n)])
    assert got.dtype == torch.bool
    assert torch.equal(got, want), (got != want).nonzero()[:5].tolist()


def test_sparse_strided_is_the_sparse_transformer_pattern() -> None:
    """Child et al. 2019, strided: query i sees the last w keys and every key a multiple of s
    back (its own residue mod s), not a fixed set of keys j = 0 mod s shared by all queries."""
    cfg = M.AttentionConfig.from_json({"kind": "sparse_strided", "window": 2, "stride": 4})
    pos = torch.arange(12)
    mask = M.allowed(cfg, pos[:, None], pos[None, :])
    assert mask[10].nonzero().flatten().tolist() == [2, 6, 9, 10]
    assert mask[11].nonzero().flatten().tolist() == [3, 7, 10, 11]
    assert not mask[10, 0] and not mask[10, 4] and not mask[10, 8]
    # Visibility comes back: key 2 is hidden from query 7 but seen again by 10.
    assert mask[6, 2] and not mask[7, 2] and mask[10, 2]


# ------------------------------------------------------------------------------------------------
# KV caches keep exactly the keys the last query or a later one sees
# ------------------------------------------------------------------------------------------------
KV_LAYERS: List[Dict[str, Any]] = [
    {"kind": "softmax"},
    {"kind": "polynomial"},
    {"kind": "sliding_window", "window": 5},
    {"kind": "sliding_window", "window": 1},
    {"kind": "sparse_strided", "window": 3, "stride": 4},
    {"kind": "sparse_strided", "window": 1, "stride": 3},
    {"kind": "sparse_fixed", "chunk": 5, "summary": 2},
    {"kind": "sparse_fixed", "chunk": 3, "summary": 3},
]


def expected_cache_len(layer: Dict[str, Any], t: int) -> int:
    """Closed-form cache length after the token at position t."""
    kind = layer["kind"]
    if kind == "sliding_window":
        return min(t + 1, layer["window"])
    if kind == "sparse_fixed":
        c, summary = layer["chunk"], layer["summary"]
        return t % c + 1 + summary * (t // c)
    return t + 1  # softmax, polynomial, sparse_strided: every key stays reachable


@pytest.mark.parametrize("layer", KV_LAYERS, ids=layer_id)
def test_kv_cache_holds_only_reachable_keys(layer: Dict[str, Any]) -> None:
    n, horizon = 30, 40  # horizon > window + stride: every key a later query sees shows up
    model = make_model([layer])
    tokens = make_tokens(2, n)
    states = model.init_state(2)
    for t in range(n):
        decode(model, tokens[:, :t + 1], states, t)
        st = states[0]
        kept = st.pos.tolist()
        reachable = [j for j in range(t + 1)
                     if any(brute_allowed(layer, i, j) for i in range(t, t + horizon))]
        assert kept == reachable, f"t={t}"
        assert len(kept) == expected_cache_len(layer, t), f"t={t}"
        assert st.k.shape == st.v.shape == (2, model.cfg.n_heads, len(kept), model.cfg.head_dim)


@pytest.mark.parametrize("layer", KV_LAYERS, ids=layer_id)
def test_kv_cache_after_prefill_equals_cache_after_decode(layer: Dict[str, Any]) -> None:
    model = make_model([layer])
    tokens = make_tokens(2, 17)
    _, by_prefill = prefill(model, tokens, [6, 4, 7])
    states = model.init_state(2)
    decode(model, tokens, states, 0)
    for a, b in zip(by_prefill, states):
        assert torch.equal(a.pos, b.pos)
        assert_close(a.k, b.k, "cached keys")
        assert_close(a.v, b.v, "cached values")


# ------------------------------------------------------------------------------------------------
# polysketch: constant state, plus <= b local keys with local_exact
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sketch", ["random", "learned"])
@pytest.mark.parametrize("local,b", [(False, None), (True, 1), (True, 4)])
def test_sketch_state_size_is_bounded(sketch: str, local: bool, b: int) -> None:
    r, batch, n_layers = 3, 2, 2
    layer: Dict[str, Any] = {"kind": "polysketch", "sketch": sketch, "sketch_size": r,
                             "local_exact": local}
    if local:
        layer["block_size"] = b
    model = make_model([layer] * n_layers)
    H, h = model.cfg.n_heads, model.cfg.head_dim
    sums = (2 if local else 1) * batch * H * r * r * (h + 1)  # s_prev (and s_cur) per layer
    tokens = make_tokens(batch, 15)
    states = model.init_state(batch)
    assert M.state_floats(states) == n_layers * sums
    for t in range(tokens.shape[1]):
        decode(model, tokens[:, :t + 1], states, t)
        local_keys = t % b + 1 if local else 0
        for st in states:
            if local:
                assert st.k_loc.shape[2] == st.v_loc.shape[2] == local_keys, f"t={t}"
                assert local_keys <= b
            assert st.s_prev.shape == (batch, H, r * r, h + 1)
        want = n_layers * (sums + 2 * batch * H * h * local_keys)
        assert M.state_floats(states) == want, f"t={t}"
    # prefill leaves the same shapes as decode did (including a full last block)
    for n in (12, 13):
        _, st_p = prefill(model, tokens[:, :n])
        local_keys = (n - 1) % b + 1 if local else 0
        assert M.state_floats(st_p) == n_layers * (sums + 2 * batch * H * h * local_keys)


# ------------------------------------------------------------------------------------------------
# Exact weights by hand: polynomial, and polysketch local_exact block alignment
# ------------------------------------------------------------------------------------------------
def layer_norm(x: List[float], weight: torch.Tensor, bias: torch.Tensor,
               eps: float = M.LN_EPS) -> List[float]:
    mean = sum(x) / len(x)
    var = sum((a - mean) * (a - mean) for a in x) / len(x)
    inv = 1.0 / math.sqrt(var + eps)
    return [(a - mean) * inv * float(w) + float(c) for a, w, c in zip(x, weight, bias)]


def dot(a: List[float], b: List[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def normalised_sum(weights: List[float], values: List[List[float]], one: float) -> List[float]:
    """sum_j w_j v_j / (one + sum_j w_j)."""
    den = one + sum(weights)
    return [sum(w * v[c] for w, v in zip(weights, values)) / den for c in range(len(values[0]))]


def random_qkv(n: int, H: int, h: int, scale: float, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(1, H, n, h, generator=g, dtype=torch.float64) for _ in range(3)]


def test_polynomial_weights_by_hand() -> None:
    """(q^.k^)^4 / (1 + sum): one shared LayerNorm, no 1/sqrt(h), the 1.0 exactly."""
    model = make_model([{"kind": "polynomial"}], d_model=8, n_heads=2)
    attn = model.blocks[0].attn
    with torch.no_grad():  # small norm scale, so sum w is O(1) and the "1 +" matters a lot
        attn.qk_norm.weight.mul_(0.35)
        attn.qk_norm.bias.mul_(0.35)
    n, head = 9, 1
    q, k, v = random_qkv(n, 2, 4, scale=2.0)
    with torch.no_grad():
        got = attn.dense(q, k, v)[0, head]
    wgt, bias = attn.qk_norm.weight, attn.qk_norm.bias
    qn = [layer_norm(q[0, head, i].tolist(), wgt, bias) for i in range(n)]
    kn = [layer_norm(k[0, head, j].tolist(), wgt, bias) for j in range(n)]
    vv = [v[0, head, j].tolist() for j in range(n)]
    for one in (1.0, 0.0):
        want = []
        for i in range(n):
            w = []
            for j in range(i + 1):
                s = dot(qn[i], kn[j])
                w.append((s * s) * (s * s))
            want.append(normalised_sum(w, vv[:i + 1], one))
        want_t = torch.tensor(want, dtype=torch.float64)
        if one == 1.0:
            assert_close(got, want_t, "polynomial dense vs hand loop")
        else:  # the test can tell the "1 +" apart from a plain weighted mean
            assert (got - want_t).abs().max() > 1e-3


@pytest.mark.parametrize("sketch", ["random", "learned"])
def test_local_exact_weights_by_hand(sketch: str) -> None:
    """Exact (q~.k~)^4 for keys in the query's block [floor(i/b) b, i], (psi(q).psi(k))^2 for
    earlier blocks, one shared normaliser 1 + sum."""
    b, n = 3, 10
    model = make_model([{"kind": "polysketch", "sketch": sketch, "sketch_size": 4,
                         "local_exact": True, "block_size": b}], d_model=8, n_heads=2)
    attn = model.blocks[0].attn
    q, k, v = random_qkv(n, 2, 4, scale=1.0)
    with torch.no_grad():
        got = attn.dense(q, k, v)[0, 0]
        a, bk = attn.psi(q)[0, 0].tolist(), attn.psi(k)[0, 0].tolist()
    lq, lk = attn.local_q_norm, attn.local_k_norm
    qt = [layer_norm(q[0, 0, i].tolist(), lq.weight, lq.bias) for i in range(n)]
    kt = [layer_norm(k[0, 0, j].tolist(), lk.weight, lk.bias) for j in range(n)]
    vv = [v[0, 0, j].tolist() for j in range(n)]
    want = []
    for i in range(n):
        w = []
        for j in range(i + 1):
            if i // b == j // b:  # same block, aligned to position 0: exact degree 4
                s = dot(qt[i], kt[j])
                w.append((s * s) * (s * s))
            else:  # earlier block: sketched, (psi(q).psi(k))^2
                s = dot(a[i], bk[j])
                w.append(s * s)
        want.append(normalised_sum(w, vv[:i + 1], 1.0))
    assert_close(got, torch.tensor(want, dtype=torch.float64), "local_exact dense vs hand loop")
