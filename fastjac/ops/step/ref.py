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

from .._utils import blockdiag as _blockdiag
from .._utils import group as _g
from ..akorn.ref import antisym, omega_apply, omega_vjp, proj_forward, proj_jvp, proj_vjp
from ..attention.ref import AttnParams, msa_cache, msa_jacobian_rows, msa_jvp, msa_vjp
from ..base import BatchedLinearization
from ..norm.ref import NormParams, norm_cache, norm_jacobian_blocks, norm_jvp, norm_vjp

# A dense row-chunk (one batched GEMM's output) is kept near this many bytes. At S=64, D=64, H=4 on a 2-core CPU
# 32 MB chunks measured 26 ms per Jacobian, 256 MB 31 ms and 2 MB 40 ms; the chunk also bounds the temporaries.
DENSE_CHUNK_BYTES = 32 * 2**20


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


class StepLinearization(BatchedLinearization):
    """Base of the attention steps: subclasses implement jvp, vjp and the per-token factors of the dense rows.

    Both steps have the dense form  J_step[i, m] = eta L_i J_MSA[i, m] + delta_im E_i  with per-token D x D
    matrices L_i (left factor: the norm Jacobian, times AKOrN's projection) and E_i (the diagonal block).

    The attention forward is one overridable hook, ``_attention(X, p) -> MSA(X)``: the torch version keeps the full
    cache (probabilities included) in ``self.attn``; a kernel backend (Triton) overrides it with its own forward and
    builds ``attn`` only when a VJP or a dense Jacobian asks for it. Everything else of the step is shared.
    """

    def _attention(self, X: Tensor, p: AttnParams) -> Tensor:
        self.attn = msa_cache(X, p)
        return self.attn.out

    def _row_factors(self):  # pragma: no cover - interface
        """(L [B, S, D, D] or None for the identity, E [B, S, D, D])."""
        raise NotImplementedError

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The step Jacobian [B, S*D, S*D], token-major, written row chunk by row chunk into ``out``."""
        B, S, D = self.X.shape
        if out is None:
            out = torch.empty(B, S * D, S * D, dtype=self.X.dtype, device=self.X.device)
        rows = out.view(B, S, D, S, D)
        L, E = self._row_factors()
        chunk = max(1, min(S, DENSE_CHUNK_BYTES // max(D * S * D * self.X.element_size(), 1)))
        idx = torch.arange(S, device=out.device)
        for b in range(B):
            bs = slice(b, b + 1)
            for i0 in range(0, S, chunk):
                i1 = min(S, i0 + chunk)
                msa_jacobian_rows(
                    self.attn,
                    i0,
                    i1,
                    left=None if L is None else L[bs, i0:i1],
                    scale=self.p.eta,
                    batch=bs,
                    out=rows[bs, i0:i1],
                )
            rows[b, idx, :, idx, :] += E[b]
        return out


class ItrSALinearization(StepLinearization):
    """ItrSA step X' = Norm(X + eta (C + MSA(X))) linearised at X [B, S, D]; C broadcastable to X or None."""

    def __init__(self, X: Tensor, C: Optional[Tensor], p: ItrSAParams):
        self.X, self.p = X, p
        msa = self._attention(X, p.attn)
        F = msa if C is None else C + msa
        self.norm = norm_cache(X + p.eta * F, p.norm)
        self.out = self.norm.out

    def jvp(self, T: Tensor) -> Tensor:
        return norm_jvp(self.norm, T + self.p.eta * msa_jvp(self.attn, T))

    def vjp(self, G: Tensor) -> Tensor:
        gz = norm_vjp(self.norm, G)
        return gz + self.p.eta * msa_vjp(self.attn, gz)

    def _row_factors(self):
        if self.p.norm.kind == "none":
            eye = torch.eye(self.X.shape[-1], dtype=self.X.dtype, device=self.X.device)
            return None, eye.expand(*self.X.shape[:2], -1, -1)
        Nb = norm_jacobian_blocks(self.norm)
        return Nb, Nb


class AKOrNLinearization(StepLinearization):
    """AKOrN step X' = Pi_osc(X + eta (Omega X + Proj_X(C + MSA(X)))) linearised at X [B, S, D]."""

    def __init__(self, X: Tensor, C: Optional[Tensor], p: AKOrNParams):
        self.X, self.p = X, p
        msa = self._attention(X, p.attn)
        self.Y = msa if C is None else C + msa
        Z = X + p.eta * (omega_apply(p.omega, X) + proj_forward(X, self.Y, p.osc_dim))
        self.norm = norm_cache(Z, _osc_norm(p.osc_dim))
        self.out = self.norm.out

    def jvp(self, T: Tensor) -> Tensor:
        N = self.p.osc_dim
        dP = proj_jvp(self.X, self.Y, T, msa_jvp(self.attn, T), N)
        return norm_jvp(self.norm, T + self.p.eta * (omega_apply(self.p.omega, T) + dP))

    def vjp(self, G: Tensor) -> Tensor:
        gz = norm_vjp(self.norm, G)
        gx, gy = proj_vjp(self.X, self.Y, gz, self.p.osc_dim)
        return gz + self.p.eta * (omega_vjp(self.p.omega, gz) + gx + msa_vjp(self.attn, gy))

    def _row_factors(self):
        N = self.p.osc_dim
        Xg, Yg = _g(self.X, N), _g(self.Y.expand_as(self.X), N)  # [B, S, G, N]
        P = _blockdiag(torch.eye(N, dtype=Xg.dtype, device=Xg.device) - Xg.unsqueeze(-1) * Xg.unsqueeze(-2))
        # d(Omega X + Proj_X(Y))/dX_i on the diagonal, per oscillator: Omega_g - X_g Y_g^T - <Y_g, X_g> I
        s = (Xg * Yg).sum(-1)[..., None, None]
        blk = (
            antisym(self.p.omega)
            - Xg.unsqueeze(-1) * Yg.unsqueeze(-2)
            - s * torch.eye(N, dtype=Xg.dtype, device=Xg.device)
        )
        Nb = norm_jacobian_blocks(self.norm)
        eye = torch.eye(self.X.shape[-1], dtype=Xg.dtype, device=Xg.device)
        return Nb @ P, Nb @ (eye + self.p.eta * _blockdiag(blk))
