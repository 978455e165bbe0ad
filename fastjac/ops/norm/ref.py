"""Normalisations per group of N features ("l2", "rms", "layer", "none"): forward, JVP, VJP and dense blocks.

The three non-trivial kinds share one shape of derivative (README.md in this folder): with u the incoming tangent
(centred for "layer"), w the normalised-over quantity (z, or c = z - mean z) and s its scale,

    d Norm[u] = gamma * ( u / s - w (w . u) / (alpha s^3) ),   alpha = 1 ("l2") or N ("rms", "layer"),

a diagonal-plus-rank-one N x N block per group. Its inner matrix is symmetric, so the VJP is the same formula
applied to gamma * g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._utils import group as _grouped

NORMS = ("l2", "rms", "layer", "none")


@dataclass(frozen=True)
class NormParams:
    """kind in NORMS; gamma [D] or None (= ones); bias [D] or None (LayerNorm only); group N divides D."""

    kind: str
    gamma: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    group: int


@dataclass
class NormCache:
    """w: [B, S, G, N] (z, or c for "layer"); s: [B, S, G, 1] the scale; out: [B, S, D]."""

    params: NormParams
    w: Optional[Tensor]
    s: Optional[Tensor]
    out: Tensor

    @property
    def alpha(self) -> float:
        return 1.0 if self.params.kind == "l2" else float(self.params.group)


def norm_cache(Z: Tensor, p: NormParams) -> NormCache:
    """Normalise Z [B, S, D] per group of p.group features and keep what the derivatives need."""
    if p.kind == "none":
        return NormCache(p, None, None, Z)
    zg = _grouped(Z, p.group)
    if p.kind == "layer":
        zg = zg - zg.mean(-1, keepdim=True)
    if p.kind == "l2":
        s = torch.sqrt((zg * zg).sum(-1, keepdim=True) + p.eps)
    elif p.kind in ("rms", "layer"):
        s = torch.sqrt((zg * zg).mean(-1, keepdim=True) + p.eps)
    else:
        raise ValueError(f"norm: expected one of {NORMS}, got {p.kind!r}")
    y = (zg / s).flatten(-2)
    if p.gamma is not None:
        y = y * p.gamma
    if p.bias is not None:
        y = y + p.bias
    return NormCache(p, zg, s, y)


def norm_forward(Z: Tensor, p: NormParams) -> Tensor:
    """Norm(Z) per group of p.group features. Z: [..., S, D] -> [..., S, D].

    Example:
        >>> import torch
        >>> from fastjac.ops import NormParams, norm_forward
        >>> Y = norm_forward(torch.randn(4, 6), NormParams("l2", None, None, 0.0, 3))
        >>> torch.allclose(Y.unflatten(-1, (2, 3)).norm(dim=-1), torch.ones(4, 2))
        True
    """
    return norm_cache(Z, p).out


def _inner(c: NormCache, u: Tensor, dim: int) -> Tensor:
    # (I/s - w w^T/(alpha s^3)) u along the group axis `dim` (u already centred for "layer")
    wu = (c.w * u).sum(dim, keepdim=True)
    return u / c.s - c.w * (wu / (c.alpha * c.s**3))


def norm_jvp(c: NormCache, T: Tensor) -> Tensor:
    """d Norm[T] for tangents T [..., B, S, D]. Returns [..., B, S, D]."""
    p = c.params
    if p.kind == "none":
        return T
    u = _grouped(T, p.group)
    if p.kind == "layer":
        u = u - u.mean(-1, keepdim=True)
    y = _inner(c, u, -1).flatten(-2)
    return y if p.gamma is None else y * p.gamma


def norm_vjp(c: NormCache, G: Tensor) -> Tensor:
    """Cotangent of Z for cotangents G [..., B, S, D] on Norm(Z). Returns [..., B, S, D]."""
    p = c.params
    if p.kind == "none":
        return G
    u = _grouped(G if p.gamma is None else G * p.gamma, p.group)
    if p.kind == "layer":
        u = u - u.mean(-1, keepdim=True)
    return _inner(c, u, -1).flatten(-2)


def norm_left_apply(c: NormCache, M: Tensor, i0: int = 0) -> Tensor:
    """Left-multiply rows by the block-diagonal norm Jacobian: M [B, I, D, K] for the tokens [i0, i0+I).

    Row (i, a) of the result is sum_a' N_i[a, a'] M[i, a', :]; K is any number of columns. Each group's block is
    diag(gamma / s) - L R^T with R^T of rank 1 (w^T), or 2 for "layer" ([w, 1]^T: the centring).
    """
    p = c.params
    if p.kind == "none":
        return M
    B, I, D, K = M.shape
    G, N = D // p.group, p.group
    w, s = c.w[:, i0 : i0 + I], c.s[:, i0 : i0 + I]  # [B, I, G, N], [B, I, G, 1]
    gam = torch.ones(G, N, dtype=M.dtype, device=M.device) if p.gamma is None else p.gamma.view(G, N)
    left = (gam * w / (c.alpha * s**3)).unsqueeze(-1)  # [B, I, G, N, 1]
    right = w.unsqueeze(-2)  # [B, I, G, 1, N]
    if p.kind == "layer":
        left = torch.cat([left, (gam / (N * s)).unsqueeze(-1)], -1)  # [B, I, G, N, 2]
        right = torch.cat([right, torch.ones_like(right)], -2)  # [B, I, G, 2, N]
    u = M.reshape(B, I, G, N, K)
    return (u * (gam / s).unsqueeze(-1) - left @ (right @ u)).reshape(B, I, D, K)


def norm_jacobian_blocks(c: NormCache) -> Tensor:
    """The diagonal blocks N_i = dNorm(Z)_i / dz_i of the block-diagonal norm Jacobian. Returns [B, S, D, D]."""
    B, S, D = c.out.shape
    eye = torch.eye(D, dtype=c.out.dtype, device=c.out.device).expand(B, S, D, D)
    return norm_left_apply(c, eye)
