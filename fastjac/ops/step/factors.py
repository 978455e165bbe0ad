"""The per-token factors of the dense step Jacobian, in torch ops, shared by the kernel backends (Triton, C++).

    J_step[i, m] = eta L_i J_MSA[i, m] + delta_im E_i      (README.md in this folder)

``dense_factors`` builds, for a chunk of rows, the small factors (A, R1, U, rb, Ed) that a dense-writer kernel
expands into the output with 2H multiply-adds per element. The mixins give a linearisation the two structured
applications it needs: ``_left(M, b, i0)`` applies L_i (the normalisation's diagonal-plus-rank-one groups, and
AKOrN's per-oscillator projection) in O(D K) per token, and ``_diag_E(Dg, b, i0)`` returns L_i Dg + E_i.
Nothing here imports triton or the compiled extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import blockdiag as _blockdiag
from .._utils import group as _g
from ..akorn.ref import antisym
from ..attention.ref import _out_proj_h
from ..norm.ref import NormCache, norm_left_apply


def _sample(c: NormCache, b: int) -> NormCache:
    """The norm cache of sample b alone (norm_left_apply reads rows of every sample it is given)."""
    one = lambda t: None if t is None else t[b : b + 1]  # noqa: E731
    return NormCache(c.params, one(c.w), one(c.s), one(c.out))


def dense_out(X: Tensor, out=None) -> Tensor:
    """The output of a dense writer for X [B, S, D]: ``out`` checked ([B, S*D, S*D], X's dtype, contiguous rows),
    or a new tensor."""
    B, S, D = X.shape
    if out is None:
        return torch.empty(B, S * D, S * D, dtype=X.dtype, device=X.device)
    if out.shape != (B, S * D, S * D) or out.dtype != X.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out: expected a [{B}, {S * D}, {S * D}] {X.dtype} tensor with contiguous rows, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    return out


class ItrSADenseFactors:
    """For ItrSA linearisations: L_i = E_i = N_i, the normalisation's Jacobian at token i (None for "none")."""

    @property
    def _left(self):
        return None if self.p.norm.kind == "none" else self._norm_left

    def _norm_left(self, M: Tensor, b: int, i0: int) -> Tensor:
        return norm_left_apply(_sample(self.norm, b), M.unsqueeze(0), i0)[0]

    def _diag_E(self, Dg: Tensor, b: int, i0: int) -> Tensor:
        # E_i = N_i = L_i, so L_i Dg + E_i = L_i (Dg + I)
        Dg = Dg + torch.eye(Dg.shape[-1], dtype=Dg.dtype, device=Dg.device)
        return Dg if self._left is None else self._norm_left(Dg, b, i0)


class AKOrNDenseFactors:
    """For AKOrN linearisations: L_i = N_i P_i (P_i = I - X_g X_g^T per oscillator), E_i on the diagonal."""

    def _left(self, M: Tensor, b: int, i0: int) -> Tensor:
        # L_i = N_i P_i with P_i = I - X_g X_g^T per oscillator g
        I, D, K = M.shape
        N = self.p.osc_dim
        Xg = _g(self.X[b, i0 : i0 + I], N)  # [I, G, N]
        Mg = M.reshape(I, D // N, N, K)
        PM = Mg - Xg.unsqueeze(-1) * (Xg.unsqueeze(-2) @ Mg)
        return norm_left_apply(_sample(self.norm, b), PM.reshape(I, D, K).unsqueeze(0), i0)[0]

    def _diag_E(self, Dg: Tensor, b: int, i0: int) -> Tensor:
        # E_i = N_i (I + eta blockdiag(Omega_g - X_g Y_g^T - <Y_g, X_g> I))
        I, D, _ = Dg.shape
        N = self.p.osc_dim
        Xg = _g(self.X[b, i0 : i0 + I], N)
        Yg = _g(self.Y.expand_as(self.X)[b, i0 : i0 + I], N)
        eyeN = torch.eye(N, dtype=Dg.dtype, device=Dg.device)
        blk = antisym(self.p.omega) - Xg.unsqueeze(-1) * Yg.unsqueeze(-2) - (Xg * Yg).sum(-1)[..., None, None] * eyeN
        inner = torch.eye(D, dtype=Dg.dtype, device=Dg.device) + self.p.eta.detach() * _blockdiag(blk)
        return self._left(Dg, b, i0) + norm_left_apply(_sample(self.norm, b), inner.unsqueeze(0), i0)[0]


def dense_factors(lin, b: int, i0: int, i1: int):
    """The small factors of the dense rows [i0, i1) of sample b (module docstring).

    ``lin._left(M, b, i0)`` applies L_i to M [I, D, K] using L's structure (the norm's diagonal-plus-rank-one
    groups, AKOrN's per-oscillator projection): O(D K) per token instead of a D x D product, which keeps building
    R1 = L_i (Wv Wo)^T far below the cost of writing the output; ``lin._diag_E(Dg, b, i0)`` returns L_i Dg + E_i.
    """
    c = lin.attn
    p, eta = c.params, lin.p.eta.detach()
    A, q, k, v, o = c.A[b], c.q[b], c.k[b], c.v[b], c.o[b]  # [H, S, S], [H, S, dh], .., [H, S, dv], [H, S, dv]
    H, S, _ = A.shape
    D, I = c.out.shape[-1], i1 - i0
    AI = A[:, i0:i1]  # [H, I, S]
    wvoT = (p.wv if p.wo is None else p.wv @ p.wo).transpose(-1, -2)  # [H, D(c), D(b)]
    vo, oo = _out_proj_h(v, p.wo), _out_proj_h(o[:, i0:i1], p.wo)  # [H, S, D], [H, I, D]
    if lin._left is None:  # L = I
        R1 = (eta * wvoT).contiguous().unsqueeze(0).expand(I, H, D, D)
        diff = vo.unsqueeze(1) - oo.unsqueeze(2)  # [H, I, S, D]
    else:
        M = (eta * wvoT).permute(1, 0, 2).reshape(D, H * D).expand(I, D, H * D)
        R1 = lin._left(M, b, i0).reshape(I, D, H, D).permute(0, 2, 1, 3).contiguous()  # [I, H, D(a), D(b)]
        Lvo = lin._left(vo.permute(2, 0, 1).reshape(D, H * S).expand(I, D, H * S), b, i0).reshape(I, D, H, S)
        Loo = lin._left(oo.permute(1, 2, 0), b, i0)  # [I, D(a), H]
        diff = (Lvo - Loo.unsqueeze(-1)).permute(2, 0, 3, 1)  # [H, I, S, D(a)]
    U = (AI.unsqueeze(-1) * diff).contiguous()  # [H, I, S, D]
    rb = ((eta * p.beta) * torch.einsum("hie,hbe->ihb", q, p.wk)).contiguous()  # [S, H, D]
    # diagonal blocks: eta beta Wo^T [sum_j A_ij (v_j - o_i) k_j^T] Wq^T, then L_i, plus E_i
    Mk = torch.einsum("hij,hjv,hje->hive", AI, v, k) - o[:, i0:i1, :, None] * (AI @ k)[:, :, None, :]
    Mk = Mk if p.wo is None else torch.einsum("hva,hive->hiae", p.wo, Mk)
    diag = (eta * p.beta) * torch.einsum("hiae,hbe->iab", Mk, p.wq)  # [I, D, D]
    Ed = lin._diag_E(diag, b, i0)
    return A.contiguous(), R1, U, rb, Ed.contiguous()
