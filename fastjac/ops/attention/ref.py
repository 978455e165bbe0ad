"""Multi-head softmax self-attention: plain forward and analytic JVP / VJP / dense blocks in torch ops.

This is the ``backend="torch"`` implementation and the readable reference for the Triton kernels. The
derivation is in this folder's README.md. Every function works on a batched state ``[B, S, D]``; tangents and
cotangents may carry extra leading dimensions (k tangents: ``[k, B, S, D]``) that broadcast against the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttnParams:
    """The weights of multi-head attention (docs/design.md section 1), as the ops see them.

    wq, wk: [H, D, dh]; wv: [H, D, dv]; wo: [H, dv, D] or None (then dv == D and Wo_h = I);
    bq, bk: [H, dh] or None; bv: [H, dv] or None; bo: [D] or None.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Optional[Tensor]
    bq: Optional[Tensor]
    bk: Optional[Tensor]
    bv: Optional[Tensor]
    bo: Optional[Tensor]
    beta: float
    causal: bool

    @property
    def heads(self) -> int:
        return self.wq.shape[0]


@dataclass
class AttnCache:
    """What the derivatives need from the forward pass. q, k: [B, H, S, dh]; v, o: [B, H, S, dv]; A: [B, H, S, S]."""

    params: AttnParams
    q: Tensor
    k: Tensor
    v: Tensor
    A: Tensor
    o: Tensor
    out: Tensor  # MSA(X): [B, S, D]


def _project(X: Tensor, W: Tensor, b: Optional[Tensor] = None) -> Tensor:
    # [..., S, D] x [H, D, e] -> [..., H, S, e]
    y = torch.einsum("...sd,hde->...hse", X, W)
    return y if b is None else y + b[:, None, :]


def _out_proj(o: Tensor, wo: Optional[Tensor]) -> Tensor:
    # per-head outputs [..., H, S, dv] -> summed over heads [..., S, D]
    if wo is None:
        return o.sum(-3)
    return torch.einsum("...hsv,hvd->...sd", o, wo)


def _out_proj_t(G: Tensor, wo: Optional[Tensor], heads: int) -> Tensor:
    # adjoint of _out_proj: [..., S, D] -> [..., H, S, dv]
    if wo is None:
        return G.unsqueeze(-3).expand(*G.shape[:-2], heads, *G.shape[-2:])
    return torch.einsum("...sd,hvd->...hsv", G, wo)


def attention_probs(q: Tensor, k: Tensor, beta: float, causal: bool) -> Tensor:
    """Softmax probabilities A = softmax_j(beta q_i . k_j), zero above the diagonal when causal. [..., S, S]."""
    logits = beta * (q @ k.transpose(-1, -2))
    if causal:
        S = q.shape[-2]
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def msa_cache(X: Tensor, p: AttnParams) -> AttnCache:
    """Run the forward pass of MSA on X [B, S, D] and keep what the derivatives need."""
    q = _project(X, p.wq, p.bq)
    k = _project(X, p.wk, p.bk)
    v = _project(X, p.wv, p.bv)
    A = attention_probs(q, k, p.beta, p.causal)
    o = A @ v
    out = _out_proj(o, p.wo)
    if p.bo is not None:
        out = out + p.bo
    return AttnCache(p, q, k, v, A, o, out)


def msa_forward(X: Tensor, p: AttnParams) -> Tensor:
    """MSA(X) = bo + sum_h Wo_h^T o^h with o^h = softmax(beta q k^T) v. X: [..., S, D] -> [..., S, D].

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(12, 3)
        >>> fj.ops.msa_forward(torch.randn(5, 12), m.attn_params()).shape
        torch.Size([5, 12])
    """
    return msa_cache(X, p).out


def msa_jvp(c: AttnCache, T: Tensor) -> Tensor:
    """d MSA[T] for tangents T [..., B, S, D] (leading dims are independent tangents). Returns [..., B, S, D].

    The probabilities A come from the cache and are shared by every tangent.
    """
    p = c.params
    qd, kd, vd = _project(T, p.wq), _project(T, p.wk), _project(T, p.wv)
    Ld = p.beta * (qd @ c.k.transpose(-1, -2) + c.q @ kd.transpose(-1, -2))  # [..., B, H, S, S]
    P = c.A * Ld
    od = c.A @ vd + P @ c.v - P.sum(-1, keepdim=True) * c.o
    return _out_proj(od, p.wo)


def msa_vjp(c: AttnCache, G: Tensor) -> Tensor:
    """Cotangent of X for cotangents G [..., B, S, D] on MSA(X) (leading dims independent). Returns [..., B, S, D]."""
    p = c.params
    go = _out_proj_t(G, p.wo, p.heads)  # [..., B, H, S, dv]
    dv = c.A.transpose(-1, -2) @ go
    dA = go @ c.v.transpose(-1, -2)
    dL = c.A * (dA - (go * c.o).sum(-1, keepdim=True))
    dq = p.beta * (dL @ c.k)
    dk = p.beta * (dL.transpose(-1, -2) @ c.q)
    return (
        torch.einsum("...hse,hde->...sd", dq, p.wq)
        + torch.einsum("...hse,hde->...sd", dk, p.wk)
        + torch.einsum("...hse,hde->...sd", dv, p.wv)
    )


def msa_jacobian_rows(
    c: AttnCache,
    i0: int,
    i1: int,
    *,
    left: Optional[Tensor] = None,
    scale=1.0,
    batch: slice = slice(None),
    out: Optional[Tensor] = None,
) -> Tensor:
    """Dense blocks ``scale * left_i @ J[i, m]``, J[i, m] = dMSA_i/dx_m, for the rows i in [i0, i1).

    Returns [B, I, D, S, D] in the layout (i, a, m, b): entry [z, i, a, m, b] is d(left MSA)[z, i, a] / dX[z, m, b].
    ``left`` [B, I, D, D] is a per-token matrix applied from the left (the normalisation's Jacobian, say; default
    I); ``scale`` a number or 0-dim tensor (eta); ``batch`` selects samples of the cache; ``out`` (contiguous
    [B, I, D, S, D], e.g. rows of the final Jacobian) receives the result.

    J^h[i,m] = A_im Wv^T + beta A_im (v_m - o_i)(Wk q_i)^T + delta_im beta [sum_j A_ij (v_j - o_i) k_j^T] Wq^T,
    J[i,m] = sum_h Wo_h^T J^h[i,m]. For fixed (i, a) the first two terms are one matrix product over (h, term):
    [S, 2H] @ [2H, D], so each output element is written once by a single batched GEMM with inner size 2H, and
    ``left`` and ``scale`` are folded into the small factors. No S^2 D^2 intermediate exists.
    """
    p = c.params
    A, q, v, o = c.A[batch], c.q[batch], c.v[batch], c.o[batch]
    B, H, S, _ = A.shape
    D, I = c.out.shape[-1], i1 - i0
    AI = A[:, :, i0:i1, :]  # [B, H, I, S]
    wvoT = (p.wv if p.wo is None else p.wv @ p.wo).transpose(-1, -2)  # [H, D(a), D(b)]
    vo = _out_proj_h(v, p.wo)  # [B, H, S, D]
    oo = _out_proj_h(o[:, :, i0:i1], p.wo)  # [B, H, I, D]
    rb = (scale * p.beta) * torch.einsum("zhie,hbe->zihb", q[:, :, i0:i1], p.wk)  # beta Wk q_i: [B, I, H, D]
    if left is None:
        Lw = wvoT.expand(B, I, H, D, D)
        U = AI.unsqueeze(-1) * (vo.unsqueeze(2) - oo.unsqueeze(3))  # [B, H, I, S, D(a)]
    else:
        Lw = torch.einsum("ziac,hcb->zihab", left, wvoT)  # [B, I, H, D(a), D(b)]
        Lvo = torch.einsum("ziac,zhmc->zhima", left, vo)  # [B, H, I, S, D]
        Loo = torch.einsum("ziac,zhic->zhia", left, oo)  # [B, H, I, D]
        U = AI.unsqueeze(-1) * (Lvo - Loo.unsqueeze(3))
    # per (z, i, a): [m, (h, term)] @ [(h, term), b]
    lhs = torch.cat([AI.permute(0, 2, 3, 1).unsqueeze(2).expand(B, I, D, S, H), U.permute(0, 2, 4, 3, 1)], -1)
    rhs = torch.cat([scale * Lw.transpose(2, 3), rb.unsqueeze(2).expand(B, I, D, H, D)], -2)  # [B, I, D, 2H, D]
    if out is None:
        out = lhs @ rhs
    elif out.is_contiguous() and not (torch.is_grad_enabled() and (lhs.requires_grad or rhs.requires_grad)):
        torch.matmul(lhs, rhs, out=out)
    else:  # out= does not record autograd; copy into the view instead
        out.copy_(lhs @ rhs)
    # diagonal blocks: beta Wo^T [sum_j A_ij (v_j - o_i) k_j^T] Wq^T
    Ak = AI @ c.k[batch]  # [B, H, I, dh]
    M = torch.einsum("zhij,zhjv,zhje->zhive", AI, v, c.k[batch]) - o[:, :, i0:i1, :, None] * Ak[:, :, :, None, :]
    M = M if p.wo is None else torch.einsum("hva,zhive->zhiae", p.wo, M)
    diag = (scale * p.beta) * torch.einsum("zhiae,hbe->ziab", M, p.wq)  # [B, I, D, D]
    if left is not None:
        diag = left @ diag
    idx = torch.arange(I, device=out.device)
    out[:, idx, :, idx + i0, :] += diag.transpose(0, 1)
    return out


def _out_proj_h(x: Tensor, wo: Optional[Tensor]) -> Tensor:
    # per-head projection without the head sum: [..., H, S, dv] -> [..., H, S, D]
    return x if wo is None else torch.einsum("...hsv,hvd->...hsd", x, wo)
