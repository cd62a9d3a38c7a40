"""Shared builders for the reference-model tests: tiny float64 models and the three ways to run
them (dense forward, chunked prefill, recurrent decode), plus the comparison every test uses."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from model import ModelConfig, PolySketchFormer

# float64 logits of these models are O(10); dense, block and recurrent forms only reorder sums, which costs
# ~1e-14 relative, while any algorithmic slip (mask, block alignment, normaliser) moves logits by
# >= 1e-6 (see the sensitivity tests), so these catch bugs without flaking on rounding.
ATOL = 1e-10  # absolute floor for logits near zero: ~1e4 x float64 rounding of O(1) values
RTOL = 1e-9  # relative part: ~1e6 x float64 epsilon, far above reordering error

VOCAB = 32
D_MODEL = 16
N_HEADS = 2


def make_config(layers: List[Dict[str, Any]], d_model: int = D_MODEL, n_heads: int = N_HEADS,
                vocab: int = VOCAB, position_encoding: Optional[str] = None) -> ModelConfig:
    """A ModelConfig with one entry of `layers` per layer, through the JSON path."""
    obj: Dict[str, Any] = {
        "architecture": "polysketchformer",
        "vocab_size": vocab,
        "d_model": d_model,
        "n_layers": len(layers),
        "n_heads": n_heads,
        "max_seq_len": 64,
        "layers": layers,
    }
    if position_encoding is not None:
        obj["position_encoding"] = position_encoding
    return ModelConfig.from_json(obj)


def roughen(model: PolySketchFormer, seed: int) -> None:
    """Unit-scale weights and non-trivial norm parameters, so attention moves the logits a lot
    (the training init of std 0.02 makes attention a tiny perturbation of the residual)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                fan_in = 1 if name == "embed.weight" else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith(".weight"):  # LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # LayerNorm biases and the logit bias
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_model(layers: List[Dict[str, Any]], seed: int = 0, **shape: Any) -> PolySketchFormer:
    """A tiny float64 model in eval mode with rough (unit-scale) weights."""
    torch.manual_seed(seed)  # random sketch matrices are drawn in the constructor
    model = PolySketchFormer(make_config(layers, **shape))
    roughen(model, seed)
    return model.double().eval()


def make_tokens(batch: int, n: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (batch, n), generator=g)


@torch.no_grad()
def dense(model: PolySketchFormer, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)


@torch.no_grad()
def prefill(model: PolySketchFormer, tokens: torch.Tensor, chunks: Optional[Sequence[int]] = None,
            block_size: Optional[int] = None) -> Tuple[torch.Tensor, List[Any]]:
    """Prefills all of `tokens` from position 0 in chunks of the given sizes (default: one chunk).
    Returns the logits [B, n, V] and the decode states."""
    n = tokens.shape[1]
    chunks = [n] if chunks is None else list(chunks)
    assert sum(chunks) == n, (chunks, n)
    states = model.init_state(tokens.shape[0])
    outs, start = [], 0
    for m in chunks:
        outs.append(model.prefill(tokens[:, start:start + m], states, start, block_size))
        start += m
    return torch.cat(outs, dim=1), states


@torch.no_grad()
def decode(model: PolySketchFormer, tokens: torch.Tensor, states: List[Any],
           start: int) -> torch.Tensor:
    """Decodes tokens[:, start:] one position at a time. Returns logits [B, n - start, V]."""
    outs = [model.decode_step(tokens[:, t], states, t) for t in range(start, tokens.shape[1])]
    return torch.stack(outs, dim=1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")

