"""One recurrent step of ItrSA and of AKOrN, linearised analytically in torch ops (``backend="torch"``).

    ItrSA:  Z = X + eta (C + MSA(X)),                       X' = Norm(Z)
    AKOrN:  Z = X + eta (Omega X + Proj_X(C + MSA(X))),      X' = Pi_osc(Z)   ("l2", gamma = 1, eps = 0)

A linearisation runs the forward pass once, keeps the attention probabilities and the normalisation statistics,
and then answers any number of JVPs, VJPs and dense-row requests from that cache. All tensors are batched
[B, S, D]; tangents may carry extra leading dims ([k, B, S, D]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..akorn.ref import _g, omega_apply, omega_vjp, proj_jvp, proj_vjp, proj_forward, antisym
from ..attention.ref import AttnParams, msa_cache, msa_jacobian_rows, msa_jvp, msa_vjp
from ..norm.ref import NormParams, norm_cache, norm_jvp, norm_left_apply, norm_vjp

# Temporaries of one dense row-chunk are kept under this many bytes (the output itself is not counted).
DENSE_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ItrSAParams:
    attn: AttnParams
    norm: NormParams
    eta: Tensor  # 0-dim


@dataclass(frozen=True)
class AKOrNParams:
    attn: AttnParams
    omega: Tensor  # [G, N, N]; the step uses its anti-symmetric part
    osc_dim: int
    eta: Tensor


def _osc_norm(N: int) -> NormParams:
    return NormParams("l2", None, None, 0.0, N)


class StepLinearization:
    """Base: subclasses set ``out`` [B, S, D] and implement jvp, vjp and _dense_rows."""

    out: Tensor
    X: Tensor

    def jvp(self, T: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def vjp(self, G: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _dense_rows(self, i0: int, i1: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The step Jacobian [B, S*D, S*D], token-major, built in row chunks straight into ``out``."""
        B, S, D = self.X.shape
        if out is None:
            out = torch.empty(B, S * D, S * D, dtype=self.X.dtype, device=self.X.device)
        rows = out.view(B, S, D, S * D)
        H = self._heads
        per_row = B * D * S * D * self.X.element_size() * 4 + B * H * S * D * self.X.element_size() * 2
        chunk = max(1, min(S, DENSE_CHUNK_BYTES // max(per_row, 1)))
        for i0 in range(0, S, chunk):
            i1 = min(S, i0 + chunk)
            rows[:, i0:i1] = self._dense_rows(i0, i1)
        return out

    def _add_identity(self, J: Tensor, i0: int) -> Tensor:
        # J [B, I, D, S, D] += delta_im I
        I, D = J.shape[1], J.shape[2]
        idx = torch.arange(I, device=J.device)
        J[:, idx, :, idx + i0, :] += torch.eye(D, dtype=J.dtype, device=J.device)
        return J


class ItrSALinearization(StepLinearization):
    """ItrSA step X' = Norm(X + eta (C + MSA(X))) linearised at X [B, S, D]; C broadcastable to X or None."""

    def __init__(self, X: Tensor, C: Optional[Tensor], p: ItrSAParams):
        self.X, self.p = X, p
        self.attn = msa_cache(X, p.attn)
        F = self.attn.out if C is None else C + self.attn.out
        self.norm = norm_cache(X + p.eta * F, p.norm)
        self.out = self.norm.out
        self._heads = p.attn.heads

    def jvp(self, T: Tensor) -> Tensor:
        return norm_jvp(self.norm, T + self.p.eta * msa_jvp(self.attn, T))

    def vjp(self, G: Tensor) -> Tensor:
        gz = norm_vjp(self.norm, G)
        return gz + self.p.eta * msa_vjp(self.attn, gz)

    def _dense_rows(self, i0: int, i1: int) -> Tensor:
        J = self._add_identity(self.p.eta * msa_jacobian_rows(self.attn, i0, i1), i0)
        B, I, D, S, _ = J.shape
        return norm_left_apply(self.norm, J.reshape(B, I, D, S * D), i0)


class AKOrNLinearization(StepLinearization):
    """AKOrN step X' = Pi_osc(X + eta (Omega X + Proj_X(C + MSA(X)))) linearised at X [B, S, D]."""

    def __init__(self, X: Tensor, C: Optional[Tensor], p: AKOrNParams):
        self.X, self.p = X, p
        self.attn = msa_cache(X, p.attn)
        self.Y = self.attn.out if C is None else C + self.attn.out
        Z = X + p.eta * (omega_apply(p.omega, X) + proj_forward(X, self.Y, p.osc_dim))
        self.norm = norm_cache(Z, _osc_norm(p.osc_dim))
        self.out = self.norm.out
        self._heads = p.attn.heads

    def jvp(self, T: Tensor) -> Tensor:
        N = self.p.osc_dim
        dP = proj_jvp(self.X, self.Y, T, msa_jvp(self.attn, T), N)
        return norm_jvp(self.norm, T + self.p.eta * (omega_apply(self.p.omega, T) + dP))

    def vjp(self, G: Tensor) -> Tensor:
        gz = norm_vjp(self.norm, G)
        gx, gy = proj_vjp(self.X, self.Y, gz, self.p.osc_dim)
        return gz + self.p.eta * (omega_vjp(self.p.omega, gz) + gx + msa_vjp(self.attn, gy))

    def _dense_rows(self, i0: int, i1: int) -> Tensor:
        N = self.p.osc_dim
        Jm = msa_jacobian_rows(self.attn, i0, i1)  # [B, I, D, S, D]
        B, I, D, S, _ = Jm.shape
        G = D // N
        Xg = _g(self.X[:, i0:i1], N)  # [B, I, G, N]
        Yg = _g(self.Y.expand_as(self.X)[:, i0:i1], N)
        Jg = Jm.reshape(B, I, G, N, S * D)
        Jg = Jg - Xg[..., None] * (Xg[..., None] * Jg).sum(-2, keepdim=True)  # Proj_X on dY
        # d Proj / d X_i on the diagonal block, plus Omega: per oscillator Omega_g - X_g Y_g^T - <Y_g, X_g> I
        s = (Xg * Yg).sum(-1)[..., None, None]
        eyeN = torch.eye(N, dtype=Jm.dtype, device=Jm.device)
        blk = antisym(self.p.omega) - Xg[..., :, None] * Yg[..., None, :] - s * eyeN  # [B, I, G, N, N]
        diag = torch.einsum("zignm,gh->zignhm", blk, torch.eye(G, dtype=Jm.dtype, device=Jm.device))
        J = (self.p.eta * Jg).reshape(B, I, D, S, D)
        idx = torch.arange(I, device=J.device)
        J[:, idx, :, idx + i0, :] += (self.p.eta * diag.reshape(B, I, D, D)).transpose(0, 1)
        J = self._add_identity(J, i0)
        return norm_left_apply(self.norm, J.reshape(B, I, D, S * D), i0)
