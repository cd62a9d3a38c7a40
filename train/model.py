"""PyTorch reference of the polysketch model function (docs/algorithm.md).

This file only computes: no I/O. It is the executable form of the contract that the C++ engine
is tested against. Every attention kind exists in the forms the engine needs:
  * dense:   the masked quadratic definition (training, and the oracle for everything else);
  * prefill: the chunked form that leaves a decode state (block algorithm for polysketch);
  * decode:  one token per call against a constant-size state (polysketch) or a KV cache.

Shape letters: B batch, n tokens, D width, H heads, h head width, r sketch size, b block size,
V vocabulary, F FFN hidden width. Tensors of attention are [B, H, n, h] (head-major).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import blockwise

ATTENTION_KINDS = (
    "softmax",
    "polynomial",
    "polysketch",
    "sliding_window",
    "sparse_strided",
    "sparse_fixed",
)
SKETCH_KINDS = ("random", "learned")
POLY_DEGREE = 4
LN_EPS = 1e-5
REQUIRED_KEYS = ("architecture", "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
# Where position enters the network (config key "position_encoding"; algorithm.md section 1):
#   "sinusoidal+rope": absolute sinusoidal encodings added to the embedding, RoPE on q and k of
#                      every layer. The default: a config without the key computes this.
#   "rope":            RoPE on q and k of every layer, no absolute encoding.
#   "local_rope":      no absolute encoding; RoPE only on the exact local-block weights of
#                      polysketch local_exact layers (their q~, k~). Every other path (the sketched
#                      weights, softmax, polynomial, sparse kinds) sees q and k without position.
POSITION_ENCODINGS = ("sinusoidal+rope", "rope", "local_rope")
DEFAULT_POSITION_ENCODING = "sinusoidal+rope"
# Embedding init std. With the sinusoidal encodings added: measured, 0.02 stalls at the unigram
# loss and 1.0 starts far above it. Without them the tied head sees LN(E[t]) . E[t] = D * std at
# init, so 0.3 makes an untrained model predict its input byte (loss 56 at width 192, measured):
# GPT-2's 0.02 is the value there.
EMBED_INIT_STD = 0.3
EMBED_INIT_STD_NO_SINUSOIDAL = 0.02


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionConfig:
    """One layer's attention. Fields that do not apply to `kind` must be left at None/False."""

    kind: str = "softmax"
    sketch: Optional[str] = None  # polysketch: "random" | "learned"
    sketch_size: Optional[int] = None  # polysketch: r
    local_exact: bool = False  # polysketch: exact degree-4 weights inside the current block
    block_size: Optional[int] = None  # polysketch: b (required with local_exact)
    window: Optional[int] = None  # sliding_window, sparse_strided: number of recent keys
    stride: Optional[int] = None  # sparse_strided: also every key a multiple of stride back
    chunk: Optional[int] = None  # sparse_fixed: block length c
    summary: Optional[int] = None  # sparse_fixed: last `summary` positions of each block

    def validate(self, head_dim: int) -> None:
        k = self.kind
        if k not in ATTENTION_KINDS:
            raise ValueError(f"attention kind {k!r} is not one of {ATTENTION_KINDS}")
        def need_pos_int(name: str) -> int:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"attention kind {k!r} needs a positive integer {name!r}, "
                                 f"got {value!r}")
            return value
        if not isinstance(self.local_exact, bool):
            raise ValueError(f"local_exact must be true or false, got {self.local_exact!r}")
        allowed = {"kind"}
        if k == "polysketch":
            if self.sketch not in SKETCH_KINDS:
                raise ValueError(f"polysketch needs 'sketch' in {SKETCH_KINDS}, got {self.sketch!r}")
            need_pos_int("sketch_size")
            allowed |= {"sketch", "sketch_size", "local_exact", "block_size"}
            if self.local_exact or self.block_size is not None:
                need_pos_int("block_size")
        elif k == "sliding_window":
            need_pos_int("window")
            allowed |= {"window"}
        elif k == "sparse_strided":
            need_pos_int("window")
            need_pos_int("stride")
            allowed |= {"window", "stride"}
        elif k == "sparse_fixed":
            c = need_pos_int("chunk")
            s = need_pos_int("summary")
            if s > c:
                raise ValueError(f"sparse_fixed needs summary <= chunk, got {s} > {c}")
            allowed |= {"chunk", "summary"}
        for name in ("sketch", "sketch_size", "block_size", "window", "stride", "chunk",
                     "summary"):
            if name not in allowed and getattr(self, name) is not None:
                raise ValueError(f"key {name!r} does not apply to attention kind {k!r}")
        if self.local_exact and k != "polysketch":
            raise ValueError(f"key 'local_exact' does not apply to attention kind {k!r}")
        if head_dim % 2:
            raise ValueError(f"head width must be even for RoPE, got {head_dim}")

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind}
        for name in ("sketch", "sketch_size", "block_size", "window", "stride", "chunk",
                     "summary"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.kind == "polysketch":
            out["local_exact"] = bool(self.local_exact)
        return out

    @staticmethod
    def from_json(obj: Dict[str, Any]) -> "AttentionConfig":
        if not isinstance(obj, dict) or "kind" not in obj:
            raise ValueError(f"an attention entry must be an object with a 'kind', got {obj!r}")
        known = set(AttentionConfig.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown attention keys {sorted(unknown)}")
        return AttentionConfig(**obj)


@dataclass
class ModelConfig:
    """The model shape. JSON form documented in docs/model-format.md."""

    architecture: str = "polysketchformer"
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 1024  # training context; positions beyond it still compute
    layers: List[AttentionConfig] = field(default_factory=list)
    d_ff: Optional[int] = None  # derived from d_model when None: floor(8D/3 / 8) * 8
    norm_eps: float = LN_EPS
    position_encoding: str = DEFAULT_POSITION_ENCODING  # one of POSITION_ENCODINGS

    def __post_init__(self) -> None:
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = (8 * self.d_model // 3) // 8 * 8

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if self.architecture != "polysketchformer":
            raise ValueError(f"architecture {self.architecture!r} is not supported "
                             "(only 'polysketchformer')")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        eps = self.norm_eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"norm_eps must be a number in (0, 1), got {eps!r}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding {self.position_encoding!r} is not one of "
                             f"{POSITION_ENCODINGS}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.d_model % 2:
            raise ValueError("d_model must be even (sinusoidal encodings)")
        if len(self.layers) != self.n_layers:
            raise ValueError(f"{len(self.layers)} layer entries for n_layers={self.n_layers}")
        for i, layer in enumerate(self.layers):
            try:
                layer.validate(self.head_dim)
            except ValueError as e:
                raise ValueError(f"layers[{i}]: {e}") from None

    def to_json(self) -> Dict[str, Any]:
        out = {
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_ff": self.d_ff,
            "max_seq_len": self.max_seq_len,
            "norm_eps": self.norm_eps,
            "layers": [layer.to_json() for layer in self.layers],
        }
        # Written only when it is not the default, so the configs of models made before the key
        # existed are unchanged byte for byte when exported again.
        if self.position_encoding != DEFAULT_POSITION_ENCODING:
            out["position_encoding"] = self.position_encoding
        return out

    @staticmethod
    def from_json(obj: Dict[str, Any]) -> "ModelConfig":
        obj = dict(obj)
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            raise ValueError(f"config is missing required keys {missing}")
        layers_json = obj.pop("layers", None)
        default_attn = obj.pop("attention", None)
        if layers_json is not None and default_attn is not None:
            raise ValueError("config gives both 'layers' and 'attention'; give one")
        if layers_json is not None and not isinstance(layers_json, list):
            raise ValueError("'layers' must be a list of attention objects")
        n_layers = obj.get("n_layers")
        if layers_json is None:
            if default_attn is None:
                raise ValueError("config needs 'layers' (one attention per layer) or 'attention'")
            if not isinstance(n_layers, int):
                raise ValueError("config needs an integer 'n_layers'")
            layers_json = [copy.deepcopy(default_attn) for _ in range(n_layers)]
        known = set(ModelConfig.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        cfg = ModelConfig(**obj, layers=[AttentionConfig.from_json(x) for x in layers_json])
        cfg.validate()
        return cfg


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (the only GELU of this model):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). torch's fused kernel computes exactly this."""
    return F.gelu(x, approximate="tanh")


def pow4(x: torch.Tensor) -> torch.Tensor:
    """x^4 as (x*x)*(x*x): integer powers only, as the contract asks."""
    x2 = x * x
    return x2 * x2


def sinusoidal(positions: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """pe[t, 2i] = sin(t * 10000^(-i/(d/2))), pe[t, 2i+1] = cos(same). positions: [n] -> [n, d]."""
    i = torch.arange(d // 2, dtype=torch.float64)
    freq = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -i / (d // 2))
    ang = positions.cpu().to(torch.float64)[:, None] * freq[None, :]  # float64 on any device
    pe = torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(len(positions), d)
    return pe.to(device=positions.device, dtype=dtype)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary encoding, interleaved pairs written de-interleaved. x: [B, H, n, h]; positions: [n].

    y[i] = x[2i] cos - x[2i+1] sin;  y[h/2 + i] = x[2i+1] cos + x[2i] sin;  theta_i = 10000^(-2i/h).
    """
    h = x.shape[-1]
    i = torch.arange(h // 2, dtype=torch.float64)
    theta = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2.0 * i / h)
    ang = positions.cpu().to(torch.float64)[:, None] * theta[None, :]  # [n, h/2]
    cos = torch.cos(ang).to(device=x.device, dtype=x.dtype)
    sin = torch.sin(ang).to(device=x.device, dtype=x.dtype)
    even = x[..., 0::2]
    odd = x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def phi(x: torch.Tensor) -> torch.Tensor:
    """vec(x x^T) on the last dim: [..., r] -> [..., r*r]. (phi(a).phi(b) = (a.b)^2.)"""
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """C = [V | 1]: [..., h] -> [..., h+1]. The last column accumulates the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


# --------------------------------------------------------------------------------------------
# Masks: the brute-force definitions of every kind (allowed(i, j) for query i, key j)
# --------------------------------------------------------------------------------------------
def allowed(cfg: AttentionConfig, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Boolean mask of key positions j visible to query positions i (broadcasting)."""
    causal = j <= i
    if cfg.kind == "sliding_window":
        return causal & (i - j < cfg.window)
    if cfg.kind == "sparse_strided":  # Child et al. 2019: the last w keys, and i - j = 0 mod s
        return causal & ((i - j < cfg.window) | ((i - j) % cfg.stride == 0))
    if cfg.kind == "sparse_fixed":
        same_block = torch.div(i, cfg.chunk, rounding_mode="floor") == torch.div(
            j, cfg.chunk, rounding_mode="floor")
        summary = (j % cfg.chunk) >= cfg.chunk - cfg.summary
        return causal & (same_block | summary)
    return causal


def keeps_every_key(cfg: AttentionConfig) -> bool:
    """Whether a KV cache of this kind must keep every key. Causal kinds see every earlier key;
    under sparse_strided key j is seen again by query j + m*s for every m, so no key is ever
    unreachable even though the latest query may not see it."""
    return cfg.kind in ("softmax", "polynomial", "sparse_strided")


def same_block(i: torch.Tensor, j: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(i, b, rounding_mode="floor") == torch.div(j, b, rounding_mode="floor")


# --------------------------------------------------------------------------------------------
# Decode states
# --------------------------------------------------------------------------------------------
@dataclass
class KVState:
    """KV cache of one layer for softmax, polynomial and sparse kinds: only entries that some
    later query can still see are kept (sliding window: a ring of w; fixed: current block plus
    summaries; softmax, polynomial and strided: every key, see keeps_every_key). k is what the weight consumes (post-RoPE, and
    normalised for the polynomial kind)."""

    pos: torch.Tensor  # [m] int64
    k: torch.Tensor  # [B, H, m, h]
    v: torch.Tensor  # [B, H, m, h]


@dataclass
class SketchState:
    """Constant-size state of one polysketch layer.

    s_prev: [B, H, r*r, h+1] sum of phi(psi(k)) (x) [v; 1] over tokens of completed blocks (all
            tokens for a plain sketch). Stored unpacked here; the engine packs r(r+1)/2 rows.
    s_cur, k_loc, v_loc: local_exact only. s_cur is the same sum over the current block's
            tokens, k_loc/v_loc its <= b normalised keys and values ([B, H, m, h]).
    """

    s_prev: torch.Tensor
    s_cur: Optional[torch.Tensor] = None
    k_loc: Optional[torch.Tensor] = None
    v_loc: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------
# Sketches
# --------------------------------------------------------------------------------------------
class SketchLevel(nn.Module):
    """LN -> Linear(in, 8r) -> GELU(tanh) -> Linear(8r, r), no biases in the linears."""

    def __init__(self, d_in: int, r: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in, eps=eps)
        self.up = nn.Linear(d_in, 8 * r, bias=False)
        self.down = nn.Linear(8 * r, r, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(gelu_tanh(self.up(self.norm(x))))


class LearnedSketch(nn.Module):
    """psi(x) = sqrt(r) * tanh(f1(x) * f2(x) / sqrt(r)); each branch: level(h->r), level(r->r)."""

    def __init__(self, h: int, r: int, eps: float) -> None:
        super().__init__()
        self.r = r
        self.f1 = nn.Sequential(SketchLevel(h, r, eps), SketchLevel(r, r, eps))
        self.f2 = nn.Sequential(SketchLevel(h, r, eps), SketchLevel(r, r, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = math.sqrt(self.r)
        return s * torch.tanh(self.f1(x) * self.f2(x) / s)


class RandomSketch(nn.Module):
    """psi(x^) = (x^ S1) * (x^ S2), S1, S2 ~ N(0, 1)/sqrt(r) each, [h, r]. Stored as weights
    (buffers that are saved, never trained and never regenerated at load)."""

    def __init__(self, h: int, r: int) -> None:
        super().__init__()
        self.register_buffer("s1", torch.randn(h, r) / math.sqrt(r))
        self.register_buffer("s2", torch.randn(h, r) / math.sqrt(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.s1) * (x @ self.s2)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """One layer's attention, any kind. Inputs are post-RoPE q, k and v: [B, H, n, h]."""

    def __init__(self, cfg: AttentionConfig, d_model: int, n_heads: int, eps: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = n_heads
        h = d_model // n_heads
        self.h = h
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        k = cfg.kind
        if k == "polynomial" or (k == "polysketch" and cfg.sketch == "random"):
            self.qk_norm = nn.LayerNorm(h, eps=eps)  # ONE LayerNorm for q, k and all heads
        if k == "polysketch":
            r = cfg.sketch_size
            self.sketch = RandomSketch(h, r) if cfg.sketch == "random" else LearnedSketch(h, r, eps)
            if cfg.local_exact:
                self.local_q_norm = nn.LayerNorm(h, eps=eps)
                self.local_k_norm = nn.LayerNorm(h, eps=eps)

    # -- feature maps -------------------------------------------------------------------------
    def psi(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.sketch == "random":
            x = self.qk_norm(x)
        return self.sketch(x)

    def _poly_qk(self, q: torch.Tensor, k: torch.Tensor):
        return self.qk_norm(q), self.qk_norm(k)

    # -- dense (masked quadratic) ---------------------------------------------------------------
    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              local: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """`local`: what the local_exact norms read (q, k with RoPE under "local_rope");
        None means q and k themselves. Every form below takes it the same way."""
        n = q.shape[2]
        pos = torch.arange(n, device=q.device)
        kind = self.cfg.kind
        if kind == "polysketch":
            a, bk = self.psi(q), self.psi(k)
            w = torch.square(a @ bk.transpose(-1, -2))
            if self.cfg.local_exact:
                lq, lk = local or (q, k)
                ql, kl = self.local_q_norm(lq), self.local_k_norm(lk)
                exact = pow4(ql @ kl.transpose(-1, -2))
                w = torch.where(same_block(pos[:, None], pos[None, :], self.cfg.block_size),
                                exact, w)
            return self._poly_normalise(w, pos, pos, v)
        if kind == "polynomial":
            qn, kn = self._poly_qk(q, k)
            return self._poly_normalise(pow4(qn @ kn.transpose(-1, -2)), pos, pos, v)
        return self._softmax(q, k, v, pos, pos)

    # -- training form: linear memory (blockwise.py) --------------------------------------------
    def train_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      local: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      chunk: int = 256, recompute: bool = False) -> torch.Tensor:
        """The dense form's values and gradients without any [n, n] tensor: the block algorithm
        for polysketch, FlashAttention-style tiles for softmax, sliding window (only the tiles the
        window reaches) and exact polynomial. The sparse kinds fall back to the dense form.
        recompute: the learned sketch's MLP keeps no activations, backward recomputes it `chunk`
        tokens at a time (blockwise.recomputed)."""
        kind = self.cfg.kind
        if kind == "polysketch":
            ql = kl = None
            if self.cfg.local_exact:
                lq, lk = local or (q, k)
                ql, kl = self.local_q_norm(lq), self.local_k_norm(lk)
            if recompute and self.cfg.sketch == "learned":
                params = list(self.sketch.parameters())
                a = blockwise.recomputed(self.psi, q, params, chunk)
                bk = blockwise.recomputed(self.psi, k, params, chunk)
            else:
                a, bk = self.psi(q), self.psi(k)
            u = blockwise.sketch_attention(a, bk, with_ones(v), ql, kl,
                                           self.cfg.block_size if self.cfg.local_exact else None,
                                           chunk)
            return u[..., :-1] / (1.0 + u[..., -1:])
        if kind == "polynomial":
            qn, kn = self._poly_qk(q, k)
            u = blockwise.tiled_polynomial(qn, kn, with_ones(v), chunk)
            return u[..., :-1] / (1.0 + u[..., -1:])
        if kind == "softmax":
            return blockwise.tiled_softmax(q, k, v, 1.0 / math.sqrt(self.h), chunk)
        if kind == "sliding_window":
            return blockwise.tiled_softmax(q, k, v, 1.0 / math.sqrt(self.h), chunk,
                                           window=self.cfg.window)
        return self.dense(q, k, v, local)

    def _poly_normalise(self, w, qpos, kpos, v):
        mask = allowed(self.cfg, qpos[:, None], kpos[None, :])
        w = w.masked_fill(~mask, 0.0)
        return (w @ v) / (1.0 + w.sum(-1, keepdim=True))

    def _softmax(self, q, k, v, qpos, kpos):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.h)
        mask = allowed(self.cfg, qpos[:, None], kpos[None, :])
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    # -- states ---------------------------------------------------------------------------------
    def init_state(self, batch: int, dtype: torch.dtype, device: torch.device):
        H, h = self.n_heads, self.h
        zeros = functools.partial(torch.zeros, dtype=dtype, device=device)
        if self.cfg.kind == "polysketch":
            rr = self.cfg.sketch_size ** 2
            st = SketchState(s_prev=zeros(batch, H, rr, h + 1))
            if self.cfg.local_exact:
                st.s_cur = torch.zeros_like(st.s_prev)
                st.k_loc = zeros(batch, H, 0, h)
                st.v_loc = zeros(batch, H, 0, h)
            return st
        empty = zeros(batch, H, 0, h)
        return KVState(pos=torch.zeros(0, dtype=torch.long, device=device), k=empty,
                       v=empty.clone())

    # -- prefill from a state (block algorithm for polysketch) ---------------------------------
    def prefill(self, q, k, v, state, start: int, block_size: Optional[int] = None,
                local: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """Positions start .. start+n-1, continuing `state` (updated in place). For a plain sketch
        `block_size` (default: the config's, else 64) only changes rounding; with local_exact
        the blocks are the model's, aligned to position 0."""
        if self.cfg.kind == "polysketch":
            return self._sketch_prefill(q, k, v, state, start, block_size, local)
        return self._kv_prefill(q, k, v, state, start)

    def _kv_prefill(self, q, k, v, st: KVState, start: int):
        n = q.shape[2]
        new_pos = torch.arange(start, start + n, device=q.device)
        if self.cfg.kind == "polynomial":
            q, k = self._poly_qk(q, k)
        keys = torch.cat([st.k, k], dim=2)
        vals = torch.cat([st.v, v], dim=2)
        kpos = torch.cat([st.pos, new_pos])
        if self.cfg.kind == "polynomial":
            o = self._poly_normalise(pow4(q @ keys.transpose(-1, -2)), new_pos, kpos, vals)
        else:
            o = self._softmax(q, keys, vals, new_pos, kpos)
        if keeps_every_key(self.cfg):
            st.pos, st.k, st.v = kpos, keys, vals
            return o
        # Keep what a later query can still see: under the window and fixed kinds visibility
        # never comes back once lost, so that is what the last query sees.
        keep = allowed(self.cfg, torch.tensor(start + n - 1, device=kpos.device), kpos)
        st.pos, st.k, st.v = kpos[keep], keys[:, :, keep], vals[:, :, keep]
        return o

    def _sketch_prefill(self, q, k, v, st: SketchState, start: int, block_size, local=None):
        cfg = self.cfg
        n = q.shape[2]
        if cfg.local_exact:
            if block_size is not None and block_size != cfg.block_size:
                raise ValueError(f"local_exact model has block size {cfg.block_size}; "
                                 f"prefill asked for {block_size}")
            b = cfg.block_size
        else:
            b = block_size or cfg.block_size or 64
        a_all, b_all = self.psi(q), self.psi(k)  # [B, H, n, r]
        c_all = with_ones(v)  # [B, H, n, h+1]
        if cfg.local_exact:
            lq, lk = local or (q, k)
            ql_all, kl_all = self.local_q_norm(lq), self.local_k_norm(lk)
        outs = []
        s = 0
        while s < n:
            t0 = start + s
            if cfg.local_exact:
                e = min(n, s + b - t0 % b)  # end of this block (absolute alignment)
                if t0 % b == 0 and t0 > 0:
                    self._fold(st)
            else:
                e = min(n, s + b)
            a, bk, c = a_all[:, :, s:e], b_all[:, :, s:e], c_all[:, :, s:e]
            m = e - s
            tri = torch.tril(torch.ones(m, m, dtype=torch.bool, device=q.device))
            if cfg.local_exact:
                ql, kl = ql_all[:, :, s:e], kl_all[:, :, s:e]
                keys = torch.cat([st.k_loc, kl], dim=2)
                vals = with_ones(torch.cat([st.v_loc, v[:, :, s:e]], dim=2))
                w = pow4(ql @ keys.transpose(-1, -2))  # [B, H, m, old+m]
                old = st.k_loc.shape[2]
                mask = torch.cat([torch.ones(m, old, dtype=torch.bool, device=q.device), tri],
                                 dim=1)
                u = w.masked_fill(~mask, 0.0) @ vals
            else:
                w = torch.square(a @ bk.transpose(-1, -2)).masked_fill(~tri, 0.0)
                u = w @ c
            u = u + phi(a) @ st.s_prev  # inter-block: GEMM with inner dimension r*r
            outs.append(u[..., :-1] / (1.0 + u[..., -1:]))
            fold = phi(bk).transpose(-1, -2) @ c  # [B, H, r*r, h+1]
            if cfg.local_exact:
                st.s_cur = st.s_cur + fold
                st.k_loc = torch.cat([st.k_loc, kl], dim=2)
                st.v_loc = torch.cat([st.v_loc, v[:, :, s:e]], dim=2)
            else:
                st.s_prev = st.s_prev + fold
            s = e
        return torch.cat(outs, dim=2)

    @staticmethod
    def _fold(st: SketchState) -> None:
        st.s_prev = st.s_prev + st.s_cur
        st.s_cur = torch.zeros_like(st.s_cur)
        st.k_loc = st.k_loc[:, :, :0]
        st.v_loc = st.v_loc[:, :, :0]

    # -- recurrent decode -----------------------------------------------------------------------
    def decode(self, q, k, v, state, t: int,
               local: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """One token at position t. q, k, v: [B, H, 1, h]. Returns [B, H, 1, h]."""
        if self.cfg.kind != "polysketch":
            return self._kv_prefill(q, k, v, state, t)  # one query against the cache
        st: SketchState = state
        a, bk = self.psi(q)[:, :, 0], self.psi(k)[:, :, 0]  # [B, H, r]
        upd = phi(bk)[..., :, None] * with_ones(v[:, :, 0])[..., None, :]  # [B, H, r*r, h+1]
        pa = phi(a)[:, :, None, :]  # [B, H, 1, r*r]
        if not self.cfg.local_exact:
            st.s_prev = st.s_prev + upd  # update first: a token attends to itself
            u = (pa @ st.s_prev)[:, :, 0]
        else:
            if t % self.cfg.block_size == 0 and t > 0:
                self._fold(st)
            st.s_cur = st.s_cur + upd
            lq, lk = local or (q, k)
            st.k_loc = torch.cat([st.k_loc, self.local_k_norm(lk)], dim=2)
            st.v_loc = torch.cat([st.v_loc, v], dim=2)
            ql = self.local_q_norm(lq)  # [B, H, 1, h]
            w = pow4(ql @ st.k_loc.transpose(-1, -2))  # [B, H, 1, m]
            u = (pa @ st.s_prev)[:, :, 0] + (w @ with_ones(st.v_loc))[:, :, 0]
        o = u[..., :-1] / (1.0 + u[..., -1:])
        return o[:, :, None, :]


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class FFN(nn.Module):
    """GELU-gated unit: [a | g] = x W_up; out = (a * gelu(g)) W_down."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.up(x).chunk(2, dim=-1)
        return self.down(a * gelu_tanh(g))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: AttentionConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(attn, cfg.d_model, cfg.n_heads, cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FFN(cfg.d_model, cfg.d_ff)


class PolySketchFormer(nn.Module):
    """Architecture `polysketchformer` of algorithm.md section 1."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, a) for a in cfg.layers])
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.logit_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style N(0, 0.02) with residual projections scaled by 1/sqrt(2L); see below for
        the embedding and the sketch network."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
                if name.endswith("attn.out.weight") or name.endswith("ffn.down.weight"):
                    p.data /= math.sqrt(2 * self.cfg.n_layers)
        # The sinusoidal encodings are added unscaled (rms ~0.7 per dimension); a 0.02 embedding
        # would hide the token under its position and training stalls at the unigram loss.
        std = (EMBED_INIT_STD if self.cfg.position_encoding == "sinusoidal+rope"
               else EMBED_INIT_STD_NO_SINUSOIDAL)
        nn.init.normal_(self.embed.weight, 0.0, std)
        for m in self.modules():
            if isinstance(m, LearnedSketch):  # keep the sketch network at unit scale
                for lin in m.modules():
                    if isinstance(lin, nn.Linear):
                        nn.init.normal_(lin.weight, 0.0, 1.0 / math.sqrt(lin.in_features))

    # -- shared plumbing ------------------------------------------------------------------------
    def _qkv(self, blk: Block, x: torch.Tensor, positions: torch.Tensor):
        B, n, D = x.shape
        H = self.cfg.n_heads
        qkv = blk.attn.qkv(blk.ln1(x)).view(B, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, n, h]
        if self.cfg.position_encoding != "local_rope":
            return rope(q, positions), rope(k, positions), v, None
        # RoPE only where the exact local-block weights read q and k (POSITION_ENCODINGS).
        local = (rope(q, positions), rope(k, positions)) if blk.attn.cfg.local_exact else None
        return q, k, v, local

    def _finish_attn(self, blk: Block, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        B, H, n, h = o.shape
        x = x + blk.attn.out(o.transpose(1, 2).reshape(B, n, H * h))
        return x + blk.ffn(blk.ln2(x))

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.cfg.position_encoding != "sinusoidal+rope":
            return x
        return x + sinusoidal(positions, self.cfg.d_model, x.dtype)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x) @ self.embed.weight.t() + self.logit_bias

    # -- the three forms ------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, form: str = "dense", chunk: int = 256,
                checkpoint: bool = False, recompute_sketch: bool = False) -> torch.Tensor:
        """tokens: [B, n] int64 -> logits [B, n, V], from position 0.

        form "dense": the masked quadratic definition. form "block": the same function in linear
        memory for training at long n (Attention.train_forward; `chunk` tokens per chunk or tile).
        checkpoint: recompute each block's activations in backward (torch.utils.checkpoint), so
        stored activations are one [B, n, D] tensor per block.
        recompute_sketch (form "block" only): the learned sketch's MLP keeps no activations and
        backward recomputes it chunk by chunk, so its activations (8r wide per head) exist for
        one chunk at a time: 2.5-2.8x less activation memory, for one more forward of the MLP
        (0.55-0.70x the tokens/s on the tiny shape, where that MLP is more than half of a
        layer's work; docs/performance.md). No effect on the other kinds."""
        if form not in ("dense", "block"):
            raise ValueError(f"form must be 'dense' or 'block', got {form!r}")
        if recompute_sketch and form != "block":
            raise ValueError("recompute_sketch needs form 'block' (the dense form has no "
                             "chunks to recompute)")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self._embed(tokens, positions)
        for blk in self.blocks:
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._block, blk, x, positions, form, chunk,
                                                      recompute_sketch, use_reentrant=False)
            else:
                x = self._block(blk, x, positions, form, chunk, recompute_sketch)
        return self._head(x)

    def _block(self, blk: Block, x: torch.Tensor, positions: torch.Tensor, form: str,
               chunk: int, recompute: bool = False) -> torch.Tensor:
        q, k, v, local = self._qkv(blk, x, positions)
        if form == "dense":
            return self._finish_attn(blk, x, blk.attn.dense(q, k, v, local))
        return self._finish_attn(blk, x, blk.attn.train_forward(q, k, v, local, chunk,
                                                                recompute))

    def init_state(self, batch: int = 1, dtype: Optional[torch.dtype] = None) -> List[Any]:
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        return [blk.attn.init_state(batch, dtype, device) for blk in self.blocks]

    def prefill(self, tokens: torch.Tensor, states: List[Any], start: int = 0,
                block_size: Optional[int] = None) -> torch.Tensor:
        """Chunk of tokens at positions start.., continuing `states` (updated in place).
        tokens: [B, n] -> logits [B, n, V]."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self._embed(tokens, positions)
        for blk, st in zip(self.blocks, states):
            q, k, v, local = self._qkv(blk, x, positions)
            x = self._finish_attn(blk, x, blk.attn.prefill(q, k, v, st, start, block_size, local))
        return self._head(x)

    def prefill_chunked(self, tokens: torch.Tensor, states: List[Any], chunk: int,
                        start: int = 0) -> torch.Tensor:
        """prefill() in pieces of `chunk` tokens, so activations stay bounded for any prompt
        length; the logits equal one prefill() over all of `tokens`. [B, n] -> [B, n, V]."""
        if chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
        return torch.cat([self.prefill(tokens[:, s:s + chunk], states, start + s)
                          for s in range(0, tokens.shape[1], chunk)], dim=1)

    def decode_step(self, tokens: torch.Tensor, states: List[Any], t: int) -> torch.Tensor:
        """One token per sequence at position t. tokens: [B] -> logits [B, V]."""
        positions = torch.tensor([t], device=tokens.device)
        x = self._embed(tokens[:, None], positions)
        for blk, st in zip(self.blocks, states):
            q, k, v, local = self._qkv(blk, x, positions)
            x = self._finish_attn(blk, x, blk.attn.decode(q, k, v, st, t, local))
        return self._head(x)[:, 0]


def state_floats(states: List[Any]) -> int:
    """Number of floats held by decode states (what the engine would keep per request)."""
    total = 0
    for st in states:
        for t in vars(st).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                total += t.numel()
    return total
