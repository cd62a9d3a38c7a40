"""The linear-memory training forms (train/blockwise.py) equal the dense forms: loss and every
gradient, in float64, for each polysketch variant and the tiled softmax / polynomial baselines, at
lengths that are and are not multiples of the block and chunk (issue 14 items 1 and 2)."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

import blockwise
from helpers import make_model, make_tokens
from model import LearnedSketch, with_ones

# float64 throughout: the forms only regroup sums (~1e-15 relative), while a wrong mask, block
# alignment or adjoint moves a gradient by far more than 1e-10 relative.
RTOL = 1e-10


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def loss_and_grads(model, tokens: torch.Tensor, **forward: Any):
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1], **forward)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def assert_forms_agree(model, tokens: torch.Tensor, chunk: int, checkpoint: bool = False,
                       recompute_sketch: bool = False) -> None:
    want_loss, want = loss_and_grads(model, tokens)
    got_loss, got = loss_and_grads(model, tokens, form="block", chunk=chunk,
                                   checkpoint=checkpoint, recompute_sketch=recompute_sketch)
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss), (got_loss, want_loss)
    assert set(got) == set(want)
    for name in want:
        assert rel_err(got[name], want[name]) <= RTOL, (name, rel_err(got[name], want[name]))


def sketch_layer(sketch: str, local: bool, b: int = 4) -> Dict[str, Any]:
    layer: Dict[str, Any] = {"kind": "polysketch", "sketch": sketch, "sketch_size": 4,
                             "local_exact": local}
    if local:
        layer["block_size"] = b
    return layer


SKETCHES = [
    pytest.param("random", False, id="random"),
    pytest.param("random", True, id="random-local"),
    pytest.param("learned", False, id="learned"),
    pytest.param("learned", True, id="learned-local"),
]


# n counts the model's input tokens (tokens has n + 1): 16 is a multiple of b = 4 and of the
# chunks, 23 and 9 are not; chunk 5 is rounded up to 8 for local_exact (a multiple of b).
@pytest.mark.parametrize("sketch,local", SKETCHES)
@pytest.mark.parametrize("n,chunk", [(16, 8), (23, 8), (23, 5), (9, 64), (16, 1)])
def test_sketch_block_form_equals_dense(sketch: str, local: bool, n: int, chunk: int) -> None:
    model = make_model([sketch_layer(sketch, local)] * 2, seed=n + chunk)
    assert_forms_agree(model, make_tokens(2, n + 1), chunk)


@pytest.mark.parametrize("mode", ["sinusoidal+rope", "rope", "local_rope"])
def test_block_form_under_every_position_encoding(mode: str) -> None:
    layers = [sketch_layer("learned", True), {"kind": "softmax"}, {"kind": "polynomial"},
              {"kind": "sliding_window", "window": 3}]
    model = make_model(layers, seed=3, position_encoding=mode)
    assert_forms_agree(model, make_tokens(2, 20), chunk=8)


@pytest.mark.parametrize("sketch", ["random", "learned"])
@pytest.mark.parametrize("checkpoint,recompute_sketch", [(True, False), (True, True),
                                                         (False, True)])
def test_checkpointed_block_form_equals_dense(sketch: str, checkpoint: bool,
                                              recompute_sketch: bool) -> None:
    # recompute_sketch: the learned sketch's MLP is recomputed in chunks (blockwise.recomputed),
    # with or without the blocks' checkpoint; the random sketch has no MLP and ignores it.
    model = make_model([sketch_layer(sketch, True), {"kind": "softmax"}], seed=4)
    assert_forms_agree(model, make_tokens(1, 18), chunk=4, checkpoint=checkpoint,
                       recompute_sketch=recompute_sketch)


def test_recompute_sketch_keeps_less_for_backward() -> None:
    """The flag reaches the learned sketch: autograd keeps far fewer floats for backward (the
    sketch MLP's 8r-wide activations are gone), counted with saved-tensor hooks."""
    model = make_model([sketch_layer("learned", True, b=16)], seed=1)
    tokens = make_tokens(1, 257)

    def saved_floats(recompute_sketch: bool) -> int:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens[:, :-1], form="block", chunk=32, recompute_sketch=recompute_sketch)
        return total[0]

    assert saved_floats(True) < 0.6 * saved_floats(False)


def test_recompute_sketch_refuses_the_dense_form() -> None:
    model = make_model([sketch_layer("learned", True)])
    with pytest.raises(ValueError, match="recompute_sketch needs form 'block'"):
        model(make_tokens(1, 4), recompute_sketch=True)


@pytest.mark.parametrize("n,chunk", [(23, 5), (16, 8), (7, 64), (9, 1)])
def test_recomputed_sketch_equals_the_direct_one(n: int, chunk: int) -> None:
    torch.manual_seed(n * 100 + chunk)
    sketch = LearnedSketch(8, 4, 1e-5).double()
    params = list(sketch.parameters())
    x = torch.randn(2, 3, n, 8, dtype=torch.float64)
    dy = torch.randn(2, 3, n, 4, dtype=torch.float64)

    def grads(fn, with_x: bool):
        xi = x.clone().requires_grad_(with_x)
        y = fn(xi)
        got = torch.autograd.grad(y, ([xi] if with_x else []) + params, dy)
        return y.detach(), got

    for with_x in (True, False):  # q and k carry gradients; a frozen input only the weights'
        want_y, want = grads(sketch, with_x)
        got_y, got = grads(lambda xi: blockwise.recomputed(sketch, xi, params, chunk), with_x)
        assert rel_err(got_y, want_y) <= RTOL
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= RTOL


def test_recomputed_refuses_a_bad_chunk_and_is_plain_without_grad() -> None:
    sketch = LearnedSketch(8, 4, 1e-5)
    x = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        blockwise.recomputed(sketch, x, list(sketch.parameters()), 0)
    with torch.no_grad():
        y = blockwise.recomputed(sketch, x, list(sketch.parameters()), 2)
    assert y.grad_fn is None and torch.equal(y, sketch(x))


@pytest.mark.parametrize("n,tile", [(16, 4), (23, 4), (7, 32), (10, 1)])
def test_tiled_softmax_and_polynomial_equal_dense(n: int, tile: int) -> None:
    model = make_model([{"kind": "softmax"}, {"kind": "polynomial"}], seed=n)
    assert_forms_agree(model, make_tokens(2, n + 1), tile)


# Windows narrower than, equal to and wider than the tile, and a window that reaches past the
# start: whole key tiles are skipped, some rows of a visited tile see nothing (the online softmax
# must not turn them into nan), and the sliding_window layer trains in linear time.
@pytest.mark.parametrize("n,tile,window", [(23, 4, 3), (23, 4, 4), (23, 4, 9), (16, 8, 5),
                                           (10, 1, 2), (9, 64, 4), (12, 4, 40)])
def test_windowed_tiled_softmax_equals_dense(n: int, tile: int, window: int) -> None:
    model = make_model([{"kind": "sliding_window", "window": window}, {"kind": "softmax"}],
                       seed=n + window)
    assert_forms_agree(model, make_tokens(2, n + 1), tile)


def test_windowed_tiles_skip_what_the_window_cannot_reach() -> None:
    # Queries 16..19 with window 3 reach keys 14..19: tiles [12, 16) and [16, 20) only.
    assert blockwise._key_tiles(16, 20, 4, 3) == [(12, 16), (16, 20)]
    assert blockwise._key_tiles(16, 20, 4, None) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    assert blockwise._key_tiles(0, 3, 4, 2) == [(0, 3)]


# ------------------------------------------------------------------------------------------------
# The functions alone: torch's finite-difference gradient check, and large-valued inputs where
# the online softmax must rescale (a naive exp would overflow).
# ------------------------------------------------------------------------------------------------
def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("local", [False, True])
def test_sketch_function_gradcheck(local: bool) -> None:
    B, H, n, r, h = 1, 2, 7, 3, 2
    a, bk, v = rand(B, H, n, r, seed=1), rand(B, H, n, r, seed=2), rand(B, H, n, h, seed=3)
    ql = rand(B, H, n, h, seed=4) if local else None
    kl = rand(B, H, n, h, seed=5) if local else None
    inputs = (a, bk, v) + ((ql, kl) if local else ())

    def f(*xs: torch.Tensor) -> torch.Tensor:
        loc = (xs[3], xs[4], 2) if local else (None, None, None)
        return blockwise.sketch_attention(xs[0], xs[1], with_ones(xs[2]), *loc, chunk=3)

    assert torch.autograd.gradcheck(f, inputs)


def test_tiled_functions_gradcheck() -> None:
    q, k, v = rand(1, 2, 9, 4, seed=6), rand(1, 2, 9, 4, seed=7), rand(1, 2, 9, 4, seed=8)
    assert torch.autograd.gradcheck(lambda *x: blockwise.tiled_softmax(*x, 0.5, 4), (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: blockwise.tiled_softmax(*x, 0.5, 2, 3), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: blockwise.tiled_polynomial(a, b, with_ones(c), 4), (q, k, v))


def test_tiled_softmax_rescales_large_scores() -> None:
    """Scores of +-300 overflow exp() unless the running maximum is subtracted."""
    q, k, v = rand(1, 1, 12, 4, seed=9, scale=12.0), rand(1, 1, 12, 4, seed=10, scale=12.0), \
        rand(1, 1, 12, 4, seed=11)
    sc = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
    want = torch.softmax(sc, -1) @ v
    got = blockwise.tiled_softmax(q, k, v, 1.0, 5)
    assert sc[sc.isfinite()].abs().max() > 100  # the case this test is for
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= RTOL


@pytest.mark.parametrize("bad", [{"chunk": 0}, {"block_size": 2}, {"block_size": 0}])
def test_sketch_function_refuses_bad_arguments(bad: Dict[str, int]) -> None:
    a = torch.zeros(1, 1, 4, 2)
    args: Dict[str, Any] = {"chunk": 2}
    args.update(bad)
    if "block_size" in bad and bad["block_size"] == 0:
        args.update(ql=torch.zeros(1, 1, 4, 2), kl=torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError):
        blockwise.sketch_attention(a, a, torch.zeros(1, 1, 4, 3), **args)


def test_forward_refuses_unknown_form() -> None:
    model = make_model([{"kind": "softmax"}])
    with pytest.raises(ValueError, match="form"):
        model(make_tokens(1, 4), form="sparse")


def test_no_n_by_n_tensor_in_block_form() -> None:
    """Memory grows linearly: the largest tensor autograd keeps for a polysketch layer at
    n = 512 is far smaller than one n x n matrix per head (recorded with saved-tensor hooks)."""
    model = make_model([sketch_layer("learned", True, b=16)], seed=1)
    tokens = make_tokens(1, 513)
    largest: List[int] = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1], form="block", chunk=32)
    logits.sum().backward()
    n, H = 512, 2
    assert largest[0] < n * n * H // 4, largest[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1])  # the dense form does keep n x n weights: the check can fail
    assert largest[0] >= n * n * H


@pytest.mark.parametrize("bad,name", [({"form": "sparse"}, "train.form"),
                                      ({"chunk": 0}, "train.chunk"),
                                      ({"chunk": 2.5}, "train.chunk"),
                                      ({"recompute_sketch": True}, "train.recompute_sketch")])
def test_train_config_refuses_bad_form_keys(bad: Dict[str, Any], name: str) -> None:
    from train import TrainConfig
    with pytest.raises(ValueError, match=name):
        TrainConfig.from_json(bad)
