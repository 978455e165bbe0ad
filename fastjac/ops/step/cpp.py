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

from ..akorn.ref import omega_apply, proj_jvp
from ..attention.cpp import msa_jvp_cpp, qkv_weight
from ..norm.cpp import norm_residual_jvp_cpp
from .factors import AKOrNDenseFactors, ItrSADenseFactors, dense_factors, dense_out
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


class CppItrSALinearization(_CppStep, ItrSADenseFactors, ItrSALinearization):
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



class CppAKOrNLinearization(_CppStep, AKOrNDenseFactors, AKOrNLinearization):
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



def step_dense_cpp(lin, out: Optional[Tensor] = None) -> Tensor:
    """The dense step Jacobian [B, S*D, S*D] of a C++ linearisation, written by ``torch.ops.fastjac.step_dense_``.

    ``lin`` provides ``attn`` (an AttnCache with A), ``p.eta``, ``_left`` and ``_diag_E`` (see dense_factors);
    ``out`` (contiguous rows) receives the result, every element written exactly once.
    """
    from .._utils import compiled_ops as ops
    X = lin.X
    B, S, D = X.shape
    out = dense_out(X, out)
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
