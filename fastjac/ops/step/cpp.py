"""One ItrSA / AKOrN step linearised on the compiled C++ kernels (``backend="cpp"``, CPU).

The forward is ref.py's (torch ops: the X W GEMMs on BLAS, one softmax whose probabilities every tangent reuses);
every JVP is the k-tangent attention kernel (``fastjac/ops/attention/cpp.py``) followed by the fused residual +
normalisation kernel (``fastjac/ops/norm/cpp.py``); the dense Jacobian is ``step_dense_cpp``: per-token factors
in torch ops (as ``dense_triton.dense_factors``), expanded by the C++ writer ``torch.ops.fastjac.step_dense_``,
which writes every output element once. The VJP stays the analytic torch path (ref.py, under no_grad): it already
shares A across cotangents in batched GEMMs.

Not differentiable in the weights: use backend="torch" for Jacobian-based training losses.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._utils import blockdiag as _blockdiag, group as _g
from ..akorn.ref import antisym, omega_apply, proj_jvp
from ..attention.cpp import msa_jvp_cpp, qkv_weight
from ..attention.ref import _out_proj_h
from ..norm.cpp import norm_residual_jvp_cpp
from ..norm.ref import NormCache, norm_left_apply
from .ref import AKOrNLinearization, AKOrNParams, ItrSALinearization, ItrSAParams

# temporaries of one row chunk of the dense factors (U, R1 and their einsum intermediates) stay near this size
DENSE_FACTOR_BYTES = 64 * 2**20


class _CppStep:
    """Shared by both steps: the attention JVP through the C++ kernel, and the dense Jacobian writer."""

    def _msa_jvp(self, T: Tensor) -> Tensor:
        if getattr(self, "_wqkv", None) is None:
            self._wqkv = qkv_weight(self.attn.params)
        return msa_jvp_cpp(self.attn, T.contiguous(), wqkv=self._wqkv)

    def vjp(self, G: Tensor) -> Tensor:
        with torch.no_grad():
            return super().vjp(G)

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The step Jacobian [B, S*D, S*D], token-major, written by the C++ writer (each element once)."""
        return step_dense_cpp(self, out)


class CppItrSALinearization(_CppStep, ItrSALinearization):
    """ItrSA X' = Norm(X + eta (C + MSA(X))) linearised at X [B, S, D] on the C++ kernels.

    The interface of every backend's linearisation: ``out``, ``jvp(T [k, B, S, D])``, ``vjp(G [k, B, S, D])``,
    ``dense(out=None)``. The forward runs once here; every jvp call reuses its probabilities and norm statistics.

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(12, 3)
        >>> lin = CppItrSALinearization(torch.randn(2, 5, 12), None, m.step_params())  # doctest: +SKIP
        >>> lin.jvp(torch.randn(4, 2, 5, 12)).shape  # doctest: +SKIP
        torch.Size([4, 2, 5, 12])
    """

    def __init__(self, X: Tensor, C: Optional[Tensor], p: ItrSAParams):
        with torch.no_grad():  # the kernels are not differentiable in the weights: build no graph
            super().__init__(X, C, p)

    def jvp(self, T: Tensor) -> Tensor:
        with torch.no_grad():
            return norm_residual_jvp_cpp(self.norm, T.contiguous(), self._msa_jvp(T), self.p.eta)

    @property
    def _left(self):
        return None if self.p.norm.kind == "none" else self._norm_left

    def _norm_left(self, M: Tensor, b: int, i0: int) -> Tensor:
        return norm_left_apply(_sample(self.norm, b), M.unsqueeze(0), i0)[0]

    def _diag_E(self, Dg: Tensor, b: int, i0: int) -> Tensor:
        # E_i = N_i = L_i, so L_i Dg + E_i = L_i (Dg + I)
        Dg = Dg + torch.eye(Dg.shape[-1], dtype=Dg.dtype, device=Dg.device)
        return Dg if self._left is None else self._norm_left(Dg, b, i0)


class CppAKOrNLinearization(_CppStep, AKOrNLinearization):
    """AKOrN X' = Pi_osc(X + eta (Omega X + Proj_X(C + MSA(X)))) linearised at X [B, S, D] on the C++ kernels.

    Interface as :class:`CppItrSALinearization`. Omega T and the projection's tangent are torch ops; the sphere
    projection's JVP is the fused norm kernel.
    """

    def __init__(self, X: Tensor, C: Optional[Tensor], p: AKOrNParams):
        with torch.no_grad():
            super().__init__(X, C, p)

    def jvp(self, T: Tensor) -> Tensor:
        with torch.no_grad():
            T = T.contiguous()
            R = omega_apply(self.p.omega, T) + proj_jvp(self.X, self.Y, T, self._msa_jvp(T), self.p.osc_dim)
            return norm_residual_jvp_cpp(self.norm, T, R.contiguous(), self.p.eta)

    def _left(self, M: Tensor, b: int, i0: int) -> Tensor:
        # L_i = N_i P_i with P_i = I - X_g X_g^T per oscillator g
        I, D, K = M.shape
        N = self.p.osc_dim
        Xg = _g(self.X[b, i0:i0 + I], N)  # [I, G, N]
        Mg = M.reshape(I, D // N, N, K)
        PM = Mg - Xg.unsqueeze(-1) * (Xg.unsqueeze(-2) @ Mg)
        return norm_left_apply(_sample(self.norm, b), PM.reshape(I, D, K).unsqueeze(0), i0)[0]

    def _diag_E(self, Dg: Tensor, b: int, i0: int) -> Tensor:
        # E_i = N_i (I + eta blockdiag(Omega_g - X_g Y_g^T - <Y_g, X_g> I))
        I, D, _ = Dg.shape
        N = self.p.osc_dim
        Xg = _g(self.X[b, i0:i0 + I], N)
        Yg = _g(self.Y.expand_as(self.X)[b, i0:i0 + I], N)
        eyeN = torch.eye(N, dtype=Dg.dtype, device=Dg.device)
        blk = antisym(self.p.omega) - Xg.unsqueeze(-1) * Yg.unsqueeze(-2) - (Xg * Yg).sum(-1)[..., None, None] * eyeN
        inner = torch.eye(D, dtype=Dg.dtype, device=Dg.device) + self.p.eta.detach() * _blockdiag(blk)
        return self._left(Dg, b, i0) + norm_left_apply(_sample(self.norm, b), inner.unsqueeze(0), i0)[0]


def _sample(c: NormCache, b: int) -> NormCache:
    """The norm cache of sample b alone (norm_left_apply reads rows of every sample it is given)."""
    one = lambda t: None if t is None else t[b:b + 1]  # noqa: E731
    return NormCache(c.params, one(c.w), one(c.s), one(c.out))


def dense_factors(lin, b: int, i0: int, i1: int):
    """The small factors (A, R1, U, rb, Ed) of the dense rows [i0, i1) of sample b; the same maths as
    ``fastjac.ops.step.dense_triton.dense_factors`` (that module imports triton, so it is not reused here).

    R1[i, h] = eta L_i (Wv_h Wo_h)^T [I, H, D, D]; U[h, i, m] = A_h[i, m] L_i Wo_h^T (v_m - o_i) [H, I, S, D];
    rb[i, h] = eta beta Wk_h q_i [S, H, D]; Ed[i] = L_i (diagonal attention block) + E_i [I, D, D].
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


def step_dense_cpp(lin, out: Optional[Tensor] = None) -> Tensor:
    """The dense step Jacobian [B, S*D, S*D] of a C++ linearisation, written by ``torch.ops.fastjac.step_dense_``.

    ``lin`` provides ``attn`` (an AttnCache with A), ``p.eta``, ``_left`` and ``_diag_E`` (see dense_factors);
    ``out`` (contiguous rows) receives the result, every element written exactly once.
    """
    from .._utils import compiled_ops as ops
    X = lin.X
    B, S, D = X.shape
    if out is None:
        out = torch.empty(B, S * D, S * D, dtype=X.dtype, device=X.device)
    elif out.shape != (B, S * D, S * D) or out.dtype != X.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected a [{B}, {S * D}, {S * D}] {X.dtype} tensor with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype}")
    write = ops().step_dense_
    with torch.no_grad():
        H = lin.attn.A.shape[1]
        per_row = (4 * H * S * D + 3 * H * D * D + 3 * D * D) * X.element_size()
        chunk = max(1, min(S, DENSE_FACTOR_BYTES // per_row))
        for b in range(B):
            for i0 in range(0, S, chunk):
                i1 = min(S, i0 + chunk)
                write(*dense_factors(lin, b, i0, i1), out[b], i0)
    return out
