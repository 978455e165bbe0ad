"""One ItrSA / AKOrN step linearised on the compiled C++ kernels (``backend="cpp"``, CPU).

The forward is the flash-tiled C++ attention (``fastjac/ops/attention/cpp.py``: q, k, v projections by torch
GEMMs, then o and the row log-sum-exp; no S x S probabilities); every JVP is the flash k-tangent attention kernel
(p recomputed per tile from lse, shared by all tangents) followed by the fused residual + normalisation kernel
(``fastjac/ops/norm/cpp.py``); the dense Jacobian is ``step_dense_cpp``: the fused C++ writer
``torch.ops.fastjac.step_dense_flash_`` builds every per-token factor itself (the probability rows, U, R1, rb,
the diagonal block) and writes every output element once. Nothing on the forward, JVP or dense path allocates an
[S, S] tensor.

The VJP stays the analytic torch path (ref.py, under no_grad), which needs the probabilities: they are built (as
by the Triton backend) only when a VJP asks for them. Not differentiable in the weights: use backend="torch" for
Jacobian-based training losses.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..akorn.ref import omega_apply, proj_jvp
from ..attention.cpp import FlashAttnCache, msa_forward_cpp, msa_jvp_cpp, qkv_weight
from ..attention.ref import AttnCache, _out_proj_h, attention_probs
from ..norm.cpp import norm_residual_jvp_cpp
from .factors import AKOrNDenseFactors, ItrSADenseFactors, dense_factors, dense_out
from .ref import AKOrNLinearization, AKOrNParams, ItrSALinearization, ItrSAParams

# the factored writer (``step_dense_factored``, op step_dense_): temporaries of one row chunk of its torch-built
# factors stay near this size
DENSE_FACTOR_BYTES = 64 * 2**20


class _CppStep:
    """Shared by both steps: the flash forward at X, the attention JVP through the C++ kernel, the fused dense
    writer, and a torch cache with the probabilities built only when a VJP asks for it."""

    def _attention(self, X: Tensor, pa) -> Tensor:
        self._fc: FlashAttnCache = msa_forward_cpp(X, pa)
        self._attn = None
        return self._fc.out

    @property
    def attn(self) -> AttnCache:
        # only the VJP (ref.msa_vjp) and the factored writer read this: [B, H, S, S] probabilities, built once
        if self._attn is None:
            c = self._fc
            A = attention_probs(c.q, c.k, c.params.beta, c.params.causal)
            self._attn = AttnCache(c.params, c.q, c.k, c.v, A, c.o, c.out)
        return self._attn

    def _msa_jvp(self, T: Tensor) -> Tensor:
        if getattr(self, "_wqkv", None) is None:
            self._wqkv = qkv_weight(self._fc.params)
        return msa_jvp_cpp(self._fc, T.contiguous(), wqkv=self._wqkv)

    def vjp(self, G: Tensor) -> Tensor:
        with torch.no_grad():
            return super().vjp(G)

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The step Jacobian [B, S*D, S*D], token-major, written by the fused C++ writer (each element once)."""
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
    """The dense step Jacobian [B, S*D, S*D] of a C++ linearisation, written by ``torch.ops.fastjac.step_dense_flash_``.

    ``lin`` provides ``_fc`` (the flash forward's cache), ``p.eta`` and ``_row_factors()`` (the per-token D x D
    matrices L_i, E_i of J_step[i, m] = eta L_i J_MSA[i, m] + delta_im E_i, from the norm's torch code: O(S D^3));
    every S-dependent factor is built inside the op. ``out`` (contiguous rows) receives the result, every element
    written exactly once.
    """
    from .._utils import compiled_ops as ops

    X = lin.X
    out = dense_out(X, out)
    c = lin._fc
    p = c.params
    with torch.no_grad():
        L, E = lin._row_factors()
        vo, oo = _out_proj_h(c.v, p.wo), _out_proj_h(c.o, p.wo)  # [B, H, S, D]: the per-head output projections
        wvoT = (p.wv if p.wo is None else p.wv @ p.wo).transpose(-1, -2)  # [H, D(a), D(b)]
        ops().step_dense_flash_(
            c.q, c.k, vo, oo, L, E, wvoT, p.wq, p.wk, float(lin.p.eta.detach()), float(p.beta), bool(p.causal), out
        )
    return out


def step_dense_factored(lin, out: Optional[Tensor] = None) -> Tensor:
    """The former dense writer, kept for comparison (bench/bench_roofline.py) and its op's tests: per-token factors
    in torch ops (``factors.dense_factors``, from the [B, H, S, S] probabilities), expanded by
    ``torch.ops.fastjac.step_dense_``."""
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
