"""The small pieces of the model against their formulas, one scalar at a time (algorithm.md
sections 1 and 2): sinusoidal encodings, RoPE, phi, GELU, the learned and random sketches."""
from __future__ import annotations

import math
from typing import List

import pytest
import torch

import model as M
from helpers import assert_close, make_model

TRIG_TOL = dict(atol=1e-12, rtol=0.0)  # float64 sin/cos of arguments <= ~1e3: ~1e-13 apart


def test_sinusoidal_formula() -> None:
    d = 10
    positions = torch.tensor([0, 1, 2, 7, 63, 1000, 4097])
    pe = M.sinusoidal(positions, d, torch.float64)
    assert pe.shape == (len(positions), d)
    for row, t in enumerate(positions.tolist()):
        for i in range(d // 2):
            angle = t * 10000.0 ** (-i / (d / 2))
            torch.testing.assert_close(pe[row, 2 * i].item(), math.sin(angle), **TRIG_TOL)
            torch.testing.assert_close(pe[row, 2 * i + 1].item(), math.cos(angle), **TRIG_TOL)


def test_sinusoidal_dtype() -> None:
    pe = M.sinusoidal(torch.arange(5), 8, torch.float32)
    assert pe.dtype == torch.float32
    # computed in float64 then rounded once
    assert torch.equal(pe, M.sinusoidal(torch.arange(5), 8, torch.float64).float())


def test_rope_formula() -> None:
    h = 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, h, generator=g, dtype=torch.float64)  # [B, H, n, h]
    positions = torch.tensor([0, 5, 130, 999])
    y = M.rope(x, positions)
    assert y.shape == x.shape
    for b in range(2):
        for head in range(3):
            for row, t in enumerate(positions.tolist()):
                v = x[b, head, row].tolist()
                for i in range(h // 2):
                    ang = t * 10000.0 ** (-2.0 * i / h)
                    c, s = math.cos(ang), math.sin(ang)
                    want_lo = v[2 * i] * c - v[2 * i + 1] * s
                    want_hi = v[2 * i + 1] * c + v[2 * i] * s
                    torch.testing.assert_close(y[b, head, row, i].item(), want_lo, **TRIG_TOL)
                    torch.testing.assert_close(y[b, head, row, h // 2 + i].item(), want_hi,
                                               **TRIG_TOL)


def test_rope_is_relative() -> None:
    """q.k after RoPE depends on the position difference only (what makes it a rotary code)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 1, 6, generator=g, dtype=torch.float64)
    dots = [(M.rope(q, torch.tensor([t + 3])) * M.rope(k, torch.tensor([t]))).sum().item()
            for t in (0, 11, 400)]
    for d in dots[1:]:
        torch.testing.assert_close(d, dots[0], atol=1e-12, rtol=1e-12)  # float64 trig rounding


def test_phi_inner_product_is_square() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert M.phi(a).shape == (5, 49)
    lhs = (M.phi(a) * M.phi(b)).sum(-1)
    rhs = (a * b).sum(-1) ** 2
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=1e-12)  # sums of 49 O(1) products
    # layout: phi(x)[a * r + c] = x[a] x[c]
    assert M.phi(a)[2, 3 * 7 + 5].item() == a[2, 3].item() * a[2, 5].item()


def test_pow4_is_integer_power() -> None:
    x = torch.tensor([-3.0, -0.5, 0.0, 1.5, 7.0], dtype=torch.float64)
    assert torch.equal(M.pow4(x), (x * x) * (x * x))
    assert M.pow4(torch.tensor([-2.0])).item() == 16.0


def test_gelu_tanh_formula() -> None:
    x = torch.linspace(-6, 6, 41, dtype=torch.float64)
    want = torch.tensor([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) *
                                                  (v + 0.044715 * v ** 3))) for v in x.tolist()],
                        dtype=torch.float64)
    torch.testing.assert_close(M.gelu_tanh(x), want, atol=1e-14, rtol=1e-14)  # float64 tanh


def test_with_ones_layout() -> None:
    v = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(M.with_ones(v), torch.tensor([[0, 1, 2, 1.0], [3, 4, 5, 1.0]]))


# ------------------------------------------------------------------------------------------------
# Sketches
# ------------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + M.LN_EPS) * norm.weight + norm.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def level(x: torch.Tensor, lvl: M.SketchLevel) -> torch.Tensor:
    """LN -> Linear(in, 8r) -> GELU(tanh) -> Linear(8r, r), by hand."""
    return gelu(layer_norm(x, lvl.norm) @ lvl.up.weight.t()) @ lvl.down.weight.t()


def test_learned_sketch_definition() -> None:
    r, h = 4, 8
    model = make_model([{"kind": "polysketch", "sketch": "learned", "sketch_size": r}],
                       d_model=16, n_heads=2)
    sk = model.blocks[0].attn.sketch
    assert isinstance(sk, M.LearnedSketch)
    assert sk.f1[0].up.weight.shape == (8 * r, h) and sk.f1[1].up.weight.shape == (8 * r, r)
    assert sk.f2[1].down.weight.shape == (r, 8 * r)
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(2, 2, 5, h, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f1 = level(level(x, sk.f1[0]), sk.f1[1])
        f2 = level(level(x, sk.f2[0]), sk.f2[1])
        want = math.sqrt(r) * torch.tanh(f1 * f2 / math.sqrt(r))
        assert_close(sk(x), want, "learned sketch")
        assert_close(model.blocks[0].attn.psi(x), want, "psi: no LayerNorm before it")
        assert sk(x).abs().max() <= math.sqrt(r)  # the tanh bound


def test_random_sketch_definition() -> None:
    """psi(x) = (LN(x) S1) * (LN(x) S2) with the layer's one shared LayerNorm."""
    model = make_model([{"kind": "polysketch", "sketch": "random", "sketch_size": 4}])
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        xn = layer_norm(x, attn.qk_norm)
        assert_close(attn.psi(x), (xn @ attn.sketch.s1) * (xn @ attn.sketch.s2), "random psi")


def test_random_sketch_scale() -> None:
    """S1, S2 ~ N(0, 1) / sqrt(r), each, independently."""
    torch.manual_seed(0)
    h, r = 64, 64
    sk = M.RandomSketch(h, r)
    for s in (sk.s1, sk.s2):
        assert s.shape == (h, r)
        std = (s * math.sqrt(r)).std().item()
        assert abs(std - 1.0) < 0.05  # 4096 samples: the std of the estimate is ~0.011
    assert not torch.equal(sk.s1, sk.s2)


def test_random_sketch_matrices_are_saved_and_restored() -> None:
    layers = [{"kind": "polysketch", "sketch": "random", "sketch_size": 4}] * 2
    a = make_model(layers, seed=1)
    state = a.state_dict()
    names = [f"blocks.{i}.attn.sketch.s{j}" for i in range(2) for j in (1, 2)]
    for name in names:
        assert name in state
    assert not any(name in dict(a.named_parameters()) for name in names)  # never trained
    b = make_model(layers, seed=2)
    assert not torch.equal(b.blocks[0].attn.sketch.s1, a.blocks[0].attn.sketch.s1)
    b.load_state_dict(state)
    for name in names:
        assert torch.equal(b.state_dict()[name], state[name]), name
    tokens = torch.arange(9)[None] % 5
    with torch.no_grad():
        assert torch.equal(b(tokens), a(tokens))


@pytest.mark.parametrize("kind,has_norm", [("polynomial", True), ("random", True),
                                           ("learned", False)])
def test_shared_qk_norm(kind: str, has_norm: bool) -> None:
    """Exact polynomial and random sketch: one LayerNorm of width h for q, k and all heads."""
    layer = ({"kind": "polynomial"} if kind == "polynomial" else
             {"kind": "polysketch", "sketch": kind, "sketch_size": 4})
    model = make_model([layer], d_model=16, n_heads=2)
    names: List[str] = [n for n, _ in model.named_parameters() if "qk_norm" in n]
    if has_norm:
        assert names == ["blocks.0.attn.qk_norm.weight", "blocks.0.attn.qk_norm.bias"]
        assert model.blocks[0].attn.qk_norm.weight.shape == (8,)
    else:
        assert names == []
