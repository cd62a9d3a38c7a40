"""Training forms of attention whose memory grows linearly in n (issue 14; algorithm.md section 3).

The dense forms in model.py materialise [n, n] weights, so training memory and time grow with n^2.
The three autograd functions here compute the same values and gradients chunk by chunk and keep
nothing of size n x n, forward or backward:

  * `sketch_attention`: polysketch (random or learned sketch, optionally local_exact). The block
    algorithm: exact weights inside a chunk, the recurrent sketch state S across chunks. Linear in
    n. Backward walks the chunks in reverse with the suffix sum R of phi(A)^T dU, the adjoint of S.
  * `tiled_softmax`: exact causal softmax attention with FlashAttention's algorithm (online
    softmax over key tiles forward; backward recomputes each tile's probabilities from the saved
    log-sum-exp). Quadratic time, linear memory: the honest baseline for training on a CPU, where
    torch 1.13 has no fused attention.
  * `tiled_polynomial`: exact polynomial attention (q^.k^)^4 / (1 + sum) tiled the same way
    (no running maximum needed: the normaliser is a plain sum).

Shape letters: B batch, H heads, n tokens, h head width, r sketch size, b local block, c chunk.
Tensors are [B, H, n, *]. The sketch and polynomial functions return U = [sum w v | sum w]
([B, H, n, h+1]); the caller forms o = U[..., :h] / (1 + U[..., h]) (algorithm.md section 3 step 3).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def _spans(n: int, size: int) -> List[Tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _phi(x: torch.Tensor) -> torch.Tensor:
    """vec(x x^T): [..., r] -> [..., r*r], so phi(a).phi(b) = (a.b)^2."""
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


def _phi_grad(dphi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. x of <dphi, phi(x)>: (M + M^T) x with M = dphi as [..., r, r]."""
    r = x.shape[-1]
    m = dphi.unflatten(-1, (r, r))
    return ((m + m.transpose(-1, -2)) @ x[..., None])[..., 0]


def _pow4(x: torch.Tensor) -> torch.Tensor:
    x2 = x * x
    return x2 * x2


def _intra_masks(s: int, e: int, b: Optional[int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Within chunk [s, e): causal mask, and where the exact local weight applies (same block of
    b aligned to position 0; all False without local_exact)."""
    pos = torch.arange(s, e, device=device)
    causal = pos[None, :] <= pos[:, None]
    if b is None:
        return causal, torch.zeros_like(causal)
    local = (pos[:, None] // b) == (pos[None, :] // b)
    return causal, causal & local


class _SketchAttention(torch.autograd.Function):
    """U[i] = sum_{j <= i} w_ij C[j], w_ij = (A_i.B_j)^2, or (QL_i.KL_j)^4 inside i's local block.

    a, bk: [B, H, n, r] sketches psi(q), psi(k); c: [B, H, n, h+1] = [v | 1];
    ql, kl: [B, H, n, h] normalised local q~, k~ (None without local_exact); b: local block;
    chunk: tokens per chunk (a multiple of b). Saves a, bk, c, ql, kl and the state S at each chunk
    start: (n / chunk) x r*r x (h+1) floats per head.
    """

    @staticmethod
    def forward(ctx, a, bk, c, ql, kl, b, chunk):
        B, H, n, r = a.shape
        S = a.new_zeros(B, H, r * r, c.shape[-1])
        out = a.new_empty(B, H, n, c.shape[-1])
        starts = []
        for s, e in _spans(n, chunk):
            starts.append(S)
            causal, local = _intra_masks(s, e, b, a.device)
            w = torch.square(a[:, :, s:e] @ bk[:, :, s:e].transpose(-1, -2))
            if b is not None:
                w = torch.where(local, _pow4(ql[:, :, s:e] @ kl[:, :, s:e].transpose(-1, -2)), w)
            w = w.masked_fill(~causal, 0.0)
            out[:, :, s:e] = w @ c[:, :, s:e] + _phi(a[:, :, s:e]) @ S
            S = S + _phi(bk[:, :, s:e]).transpose(-1, -2) @ c[:, :, s:e]
        ctx.b, ctx.chunk = b, chunk
        ctx.save_for_backward(a, bk, c, ql, kl, torch.stack(starts, dim=2))
        return out

    @staticmethod
    def backward(ctx, du):
        a, bk, c, ql, kl, starts = ctx.saved_tensors
        b, chunk = ctx.b, ctx.chunk
        n = a.shape[2]
        da, dbk, dc = torch.zeros_like(a), torch.zeros_like(bk), torch.zeros_like(c)
        dql = torch.zeros_like(ql) if b is not None else None
        dkl = torch.zeros_like(kl) if b is not None else None
        R = torch.zeros_like(starts[:, :, 0])  # d(loss)/dS for the chunks after this one
        for ci, (s, e) in reversed(list(enumerate(_spans(n, chunk)))):
            A, Bk, C, dU = a[:, :, s:e], bk[:, :, s:e], c[:, :, s:e], du[:, :, s:e]
            causal, local = _intra_masks(s, e, b, a.device)
            # intra-chunk: U += W C
            g = A @ Bk.transpose(-1, -2)
            dw = (dU @ C.transpose(-1, -2)).masked_fill(~causal, 0.0)
            w = torch.square(g)
            if b is not None:
                QL, KL = ql[:, :, s:e], kl[:, :, s:e]
                ex = QL @ KL.transpose(-1, -2)
                w = torch.where(local, _pow4(ex), w)
                dex = (dw * 4.0 * ex * ex * ex).masked_fill(~local, 0.0)
                dql[:, :, s:e] = dex @ KL
                dkl[:, :, s:e] = dex.transpose(-1, -2) @ QL
                dw = dw.masked_fill(local, 0.0)
            w = w.masked_fill(~causal, 0.0)
            dg = dw * 2.0 * g
            da_c = dg @ Bk
            dbk_c = dg.transpose(-1, -2) @ A
            dc_c = w.transpose(-1, -2) @ dU
            # inter-chunk: U += phi(A) S_start, and S_start feeds every later chunk
            S = starts[:, :, ci]
            da_c = da_c + _phi_grad(dU @ S.transpose(-1, -2), A)
            phi_b = _phi(Bk)
            dbk_c = dbk_c + _phi_grad(C @ R.transpose(-1, -2), Bk)
            dc_c = dc_c + phi_b @ R
            R = R + _phi(A).transpose(-1, -2) @ dU
            da[:, :, s:e], dbk[:, :, s:e], dc[:, :, s:e] = da_c, dbk_c, dc_c
        return da, dbk, dc, dql, dkl, None, None


def sketch_attention(a: torch.Tensor, bk: torch.Tensor, c: torch.Tensor,
                     ql: Optional[torch.Tensor] = None, kl: Optional[torch.Tensor] = None,
                     block_size: Optional[int] = None, chunk: int = 256) -> torch.Tensor:
    """Polysketch attention numerators and normaliser U ([B, H, n, h+1]) in linear memory.

    With local_exact (ql, kl and block_size given) the chunk is rounded up to a multiple of the
    block, so no local block straddles two chunks. Raises ValueError on inconsistent arguments."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if (ql is None) != (kl is None) or (ql is None) != (block_size is None):
        raise ValueError("local_exact needs ql, kl and block_size together")
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        chunk = -(-chunk // block_size) * block_size
    return _SketchAttention.apply(a, bk, c, ql, kl, block_size, chunk)


def _key_tiles(qs: int, qe: int, tile: int, window: Optional[int]) -> List[Tuple[int, int]]:
    """The key tiles [ks, ke) that queries qs..qe-1 can see: causal, and within the window."""
    lo = 0 if window is None else max(0, qs - window + 1) // tile * tile
    return [(ks, min(ks + tile, qe)) for ks in range(lo, qe, tile)]


def _mask_tile(sc: torch.Tensor, qs: int, qe: int, ks: int, ke: int, window: Optional[int],
               device) -> torch.Tensor:
    """-inf where key j is after query i, or (with a window) i - j >= window."""
    far = window is not None and qe - 1 - ks >= window  # some pair in the tile is out of reach
    if ke <= qs + 1 and not far:  # wholly visible (ke - 1 <= qs: every key at or before qs)
        return sc
    qpos = torch.arange(qs, qe, device=device)[:, None]
    kpos = torch.arange(ks, ke, device=device)[None, :]
    hidden = kpos > qpos
    if window is not None:
        hidden = hidden | (qpos - kpos >= window)
    return sc.masked_fill(hidden, float("-inf"))


class _TiledSoftmax(torch.autograd.Function):
    """o_i = sum_{j <= i} softmax_j(q_i.k_j * scale) v_j with FlashAttention's online softmax.

    Saves q, k, v, o and the log-sum-exp per query ([B, H, n]): linear memory."""

    @staticmethod
    def forward(ctx, q, k, v, scale, tile, window):
        n = q.shape[2]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3])
        for qs, qe in _spans(n, tile):
            Q = q[:, :, qs:qe] * scale
            m = q.new_full((*q.shape[:2], qe - qs, 1), float("-inf"))
            l = q.new_zeros((*q.shape[:2], qe - qs, 1))
            acc = q.new_zeros((*q.shape[:2], qe - qs, q.shape[-1]))
            for ks, ke in _key_tiles(qs, qe, tile, window):
                sc = Q @ k[:, :, ks:ke].transpose(-1, -2)
                sc = _mask_tile(sc, qs, qe, ks, ke, window, q.device)
                m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
                # A window can hide a whole row of the first tiles a query sees (m_new -inf):
                # shift by 0 there, so p and corr are exp(-inf) = 0 instead of nan.
                m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
                p = torch.exp(sc - m_safe)
                corr = torch.exp(m - m_safe)
                l = l * corr + p.sum(-1, keepdim=True)
                acc = acc * corr + p @ v[:, :, ks:ke]
                m = m_new
            out[:, :, qs:qe] = acc / l
            lse[:, :, qs:qe] = (m + torch.log(l))[..., 0]
        ctx.scale, ctx.tile, ctx.window = scale, tile, window
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        scale, tile, window = ctx.scale, ctx.tile, ctx.window
        n = q.shape[2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (do * out).sum(-1, keepdim=True)  # [B, H, n, 1]
        for qs, qe in _spans(n, tile):
            Q, dO = q[:, :, qs:qe], do[:, :, qs:qe]
            L, Dl = lse[:, :, qs:qe, None], delta[:, :, qs:qe]
            dQ = torch.zeros_like(Q)
            for ks, ke in _key_tiles(qs, qe, tile, window):
                K, V = k[:, :, ks:ke], v[:, :, ks:ke]
                sc = _mask_tile((Q @ K.transpose(-1, -2)) * scale, qs, qe, ks, ke, window,
                                q.device)
                p = torch.exp(sc - L)
                dv[:, :, ks:ke] += p.transpose(-1, -2) @ dO
                ds = p * (dO @ V.transpose(-1, -2) - Dl) * scale
                dQ += ds @ K
                dk[:, :, ks:ke] += ds.transpose(-1, -2) @ Q
            dq[:, :, qs:qe] = dQ
        return dq, dk, dv, None, None, None


def tiled_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  tile: int = 256, window: Optional[int] = None) -> torch.Tensor:
    """Causal softmax attention [B, H, n, h] in linear memory (FlashAttention's algorithm).
    window w: query i sees only keys j with i - j < w (sliding_window); key tiles wholly outside
    the window are skipped, so time is linear in n as well."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return _TiledSoftmax.apply(q, k, v, scale, tile, window)


class _TiledPolynomial(torch.autograd.Function):
    """U[i] = sum_{j <= i} (qn_i.kn_j)^4 C[j], tile by tile; saves only the inputs."""

    @staticmethod
    def forward(ctx, qn, kn, c, tile):
        n = qn.shape[2]
        out = c.new_zeros(*c.shape[:2], n, c.shape[-1])
        for qs, qe in _spans(n, tile):
            Q = qn[:, :, qs:qe]
            for ks, ke in _spans(qe, tile):
                w = _pow4(Q @ kn[:, :, ks:ke].transpose(-1, -2))
                if ke > qs:
                    qpos = torch.arange(qs, qe, device=qn.device)[:, None]
                    kpos = torch.arange(ks, ke, device=qn.device)[None, :]
                    w = w.masked_fill(kpos > qpos, 0.0)
                out[:, :, qs:qe] += w @ c[:, :, ks:ke]
        ctx.tile = tile
        ctx.save_for_backward(qn, kn, c)
        return out

    @staticmethod
    def backward(ctx, du):
        qn, kn, c = ctx.saved_tensors
        tile = ctx.tile
        n = qn.shape[2]
        dq, dk, dc = torch.zeros_like(qn), torch.zeros_like(kn), torch.zeros_like(c)
        for qs, qe in _spans(n, tile):
            Q, dU = qn[:, :, qs:qe], du[:, :, qs:qe]
            for ks, ke in _spans(qe, tile):
                K, C = kn[:, :, ks:ke], c[:, :, ks:ke]
                ex = Q @ K.transpose(-1, -2)
                dw = dU @ C.transpose(-1, -2)
                w = _pow4(ex)
                if ke > qs:
                    qpos = torch.arange(qs, qe, device=qn.device)[:, None]
                    kpos = torch.arange(ks, ke, device=qn.device)[None, :]
                    future = kpos > qpos
                    w = w.masked_fill(future, 0.0)
                    dw = dw.masked_fill(future, 0.0)
                dex = dw * 4.0 * ex * ex * ex
                dq[:, :, qs:qe] += dex @ K
                dk[:, :, ks:ke] += dex.transpose(-1, -2) @ Q
                dc[:, :, ks:ke] += w.transpose(-1, -2) @ dU
        return dq, dk, dc, None


def tiled_polynomial(qn: torch.Tensor, kn: torch.Tensor, c: torch.Tensor,
                     tile: int = 256) -> torch.Tensor:
    """Exact causal polynomial attention U ([B, H, n, h+1]) in linear memory, quadratic time."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    return _TiledPolynomial.apply(qn, kn, c, tile)


def softmax_scale(h: int) -> float:
    return 1.0 / math.sqrt(h)


class _Recomputed(torch.autograd.Function):
    """y = fn(x) for a token-wise fn (rows along dim 2 independent), keeping only x: backward
    recomputes fn one chunk of rows at a time and differentiates that chunk, so fn's inner
    activations exist for one chunk at a time instead of for all n rows."""

    @staticmethod
    def forward(ctx, x, fn, chunk, *params):
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(x[:, :, s:e]) for s, e in _spans(x.shape[2], chunk)], dim=2)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        dx = torch.empty_like(x) if want_x else None
        dparams = [torch.zeros_like(p) for p in wanted]
        for s, e in _spans(x.shape[2], ctx.chunk):
            with torch.enable_grad():
                xc = x[:, :, s:e].detach().requires_grad_(want_x)
                y = ctx.fn(xc)
                grads = torch.autograd.grad(y, ([xc] if want_x else []) + wanted,
                                            dy[:, :, s:e], allow_unused=True)
            if want_x:
                dx[:, :, s:e] = grads[0]
                grads = grads[1:]
            for acc, g in zip(dparams, grads):
                if g is not None:
                    acc += g
        it = iter(dparams)
        return (dx, None, None,
                *[next(it) if need else None for need in ctx.needs_input_grad[3:]])


def recomputed(fn, x: torch.Tensor, params: List[torch.Tensor], chunk: int) -> torch.Tensor:
    """fn(x) (token-wise along dim 2, using exactly the parameters `params`) with its activations
    recomputed in backward, `chunk` rows at a time: values and gradients of fn(x), memory of one
    chunk's activations. The learned sketch's MLP (8r wide per head, on q and on k) is most of a
    polysketch layer's activation memory at long n; this keeps it to one chunk for one more
    forward of that MLP per step."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not torch.is_grad_enabled():
        return fn(x)
    return _Recomputed.apply(x, fn, chunk, *params)
