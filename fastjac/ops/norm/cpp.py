"""Residual + normalisation JVP fused in one compiled C++ pass (``backend="cpp"``).

Kernel ``norm_jvp_fwd`` (csrc/norm_jvp.cpp) -> custom op ``torch.ops.fastjac.norm_residual_jvp`` -> public
``norm_residual_jvp_cpp``. It forms ``u = T + eta R`` per row and applies the norm's diagonal-plus-rank-one JVP
(ref.py, README.md) per group of N features, ``gamma * (u / s - w (w . u) / (alpha s^3))`` with u centred for
"layer", reading w and s from the forward cache: each tangent is read and written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ref import NormCache


def norm_residual_jvp_cpp(c: NormCache, T: Tensor, R: Tensor, eta) -> Tensor:
    """Tangent of ``Norm(X + eta (...))``: ``dNorm[T + eta R]`` per group. c: the norm cache at Z [B, S, D];
    T, R [K, B, S, D]; eta a number or 0-dim tensor. Returns [K, B, S, D]. Not differentiable in the weights.

    Example:
        >>> import torch
        >>> from fastjac.ops.norm import NormParams, norm_cache
        >>> c = norm_cache(torch.randn(2, 5, 6), NormParams("layer", None, None, 1e-6, 3))
        >>> norm_residual_jvp_cpp(c, torch.randn(4, 2, 5, 6), torch.randn(4, 2, 5, 6), 0.5).shape  # doctest: +SKIP
        torch.Size([4, 2, 5, 6])
    """
    from .._utils import compiled_ops as ops

    if T.dim() != 4 or T.shape[1:] != c.out.shape or R.shape != T.shape:
        raise ValueError(
            f"T, R: expected [K, {', '.join(map(str, c.out.shape))}], got {tuple(T.shape)} and {tuple(R.shape)}"
        )
    p = c.params
    eta_t = torch.as_tensor(eta, dtype=T.dtype).detach().reshape(())
    return ops().norm_residual_jvp(T, R, c.w, c.s, p.gamma, eta_t, p.kind, p.group)
