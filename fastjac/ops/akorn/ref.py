"""AKOrN's pieces per oscillator (group of N features): the tangent projection Proj_X and the rotation Omega.

    Proj_X(Y)_g = Y_g - <Y_g, X_g> X_g
    d Proj      = dY_g - (<dY_g, X_g> + <Y_g, dX_g>) X_g - <Y_g, X_g> dX_g
    (Omega X)_g = Omega_g X_g,  Omega_g = (W_g - W_g^T) / 2 anti-symmetric

Shapes: X, Y [..., S, D]; W [G, N, N] with G * N = D.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._utils import group as _g


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def proj_forward(X: Tensor, Y: Tensor, N: int) -> Tensor:
    """Proj_X(Y) per oscillator of N features. X, Y: [..., S, D] -> [..., S, D]."""
    Xg, Yg = _g(X, N), _g(Y, N)
    return (Yg - _dot(Yg, Xg) * Xg).flatten(-2)


def proj_jvp(X: Tensor, Y: Tensor, dX: Tensor, dY: Tensor, N: int) -> Tensor:
    """d Proj_X(Y) for tangents dX, dY [..., B, S, D] (leading dims broadcast against X, Y [B, S, D])."""
    Xg, Yg, dXg, dYg = _g(X, N), _g(Y, N), _g(dX, N), _g(dY, N)
    return (dYg - (_dot(dYg, Xg) + _dot(Yg, dXg)) * Xg - _dot(Yg, Xg) * dXg).flatten(-2)


def proj_vjp(X: Tensor, Y: Tensor, G: Tensor, N: int) -> Tuple[Tensor, Tensor]:
    """Cotangents (of X, of Y) for cotangents G [..., B, S, D] on Proj_X(Y)."""
    Xg, Yg, Gg = _g(X, N), _g(Y, N), _g(G, N)
    gx = _dot(Gg, Xg)
    return (-gx * Yg - _dot(Yg, Xg) * Gg).flatten(-2), (Gg - gx * Xg).flatten(-2)


def antisym(W: Tensor) -> Tensor:
    """(W - W^T) / 2 over the last two dims: the anti-symmetric part that AKOrN's Omega uses. [G, N, N]."""
    return 0.5 * (W - W.transpose(-1, -2))


def omega_apply(W: Tensor, X: Tensor) -> Tensor:
    """Omega X with Omega_g = antisym(W)_g acting on each oscillator. W [G, N, N]; X [..., S, D] -> [..., S, D]."""
    N = W.shape[-1]
    return torch.einsum("gnm,...gm->...gn", antisym(W), _g(X, N)).flatten(-2)


def omega_vjp(W: Tensor, G: Tensor) -> Tensor:
    """Omega^T G = -Omega G (Omega is anti-symmetric)."""
    return -omega_apply(W, G)
