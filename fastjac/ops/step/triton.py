"""One ItrSA / AKOrN step linearised on the Triton kernels (``backend="triton"``).

The forward runs the flash attention kernel once; every JVP is the k-tangent attention kernel
(``fastjac/ops/attention/triton.py``) followed by the fused residual + normalisation kernel
(``fastjac/ops/norm/triton.py``); the dense Jacobian is ``dense_triton.step_dense_triton``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._utils import INTERPRET
from ..akorn.ref import omega_apply, proj_jvp
from ..attention.ref import AttnCache, attention_probs
from ..attention.triton import msa_forward_triton, msa_jvp_triton
from ..norm.triton import norm_residual_jvp_triton
from .dense_triton import step_dense_triton
from .factors import AKOrNDenseFactors, ItrSADenseFactors
from .ref import AKOrNLinearization, AKOrNParams, ItrSALinearization, ItrSAParams

# the VJP forms [k, B, H, S, S] products: cotangents go through in chunks that keep those near this many bytes
VJP_CHUNK_BYTES = (32 if INTERPRET else 1024) * 2**20


class _TritonAttention:
    """Shared by both steps: the flash forward at X, the attention JVP kernel, and a full torch cache (with the
    S x S probabilities) built only when a VJP or a dense Jacobian asks for it."""

    def _attention(self, X: Tensor, pa) -> Tensor:
        self._msa, self._q, self._k, self._v, self._o = msa_forward_triton(X, pa)
        self._pa, self._attn = pa, None
        return self._msa

    @property
    def attn(self) -> AttnCache:
        if self._attn is None:
            A = attention_probs(self._q, self._k, self._pa.beta, self._pa.causal)
            self._attn = AttnCache(self._pa, self._q, self._k, self._v, A, self._o, self._msa)
        return self._attn

    def _msa_jvp(self, T: Tensor) -> Tensor:
        return msa_jvp_triton(self._pa, self._q, self._k, self._v, T.contiguous())

    def _vjp_chunked(self, G: Tensor, vjp_one) -> Tensor:
        # VJP decision: the analytic torch path (ref.py's msa_vjp on the cached probabilities), not a kernel. A
        # Triton VJP is a flash-attention backward (dq pass + dk/dv pass, or atomics) per cotangent; for k
        # cotangents the torch path instead runs batched tensor-core GEMMs that share A across all of them, which is
        # at least as fast at the sizes where A fits (S <= a few thousand) and is already verified. Its cost is the
        # [k, B, H, S, S] temporaries, bounded here by going through the cotangents in chunks.
        B, S, _ = self.X.shape
        H = self._q.shape[1]
        per = 4 * B * H * S * S * G.element_size()
        step = max(1, VJP_CHUNK_BYTES // max(per, 1))
        with torch.no_grad():
            if step >= G.shape[0]:
                return vjp_one(G)
            return torch.cat([vjp_one(G[j : j + step]) for j in range(0, G.shape[0], step)])

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The step Jacobian [B, S*D, S*D], token-major, from ``_step_dense_fwd_kernel``."""
        return step_dense_triton(self, out)


class TritonItrSALinearization(_TritonAttention, ItrSADenseFactors, ItrSALinearization):
    """ItrSA X' = Norm(X + eta (C + MSA(X))) linearised at X [B, S, D] on the Triton kernels.

    The same interface as the torch backend's: ``out``, ``jvp(T [k, B, S, D])``, ``vjp(G [k, B, S, D])``,
    ``dense(out=None)``. The forward runs once here; every jvp call reuses its projections and norm statistics.
    Not differentiable in the weights (use backend="torch" for Jacobian-based training losses).
    """

    def __init__(self, X: Tensor, C: Optional[Tensor], p: ItrSAParams):
        with torch.no_grad():  # the kernels are not differentiable in the weights: build no graph
            super().__init__(X, C, p)

    def jvp(self, T: Tensor) -> Tensor:
        with torch.no_grad():
            return norm_residual_jvp_triton(self.norm, T, self._msa_jvp(T), self.p.eta)

    def vjp(self, G: Tensor) -> Tensor:
        return self._vjp_chunked(G, super().vjp)


class TritonAKOrNLinearization(_TritonAttention, AKOrNDenseFactors, AKOrNLinearization):
    """AKOrN X' = Pi_osc(X + eta (Omega X + Proj_X(C + MSA(X)))) linearised at X [B, S, D] on the Triton kernels.

    Interface as :class:`TritonItrSALinearization`. Omega T and the projection's tangent are torch ops; the sphere
    projection's JVP is the fused norm kernel.
    """

    def __init__(self, X: Tensor, C: Optional[Tensor], p: AKOrNParams):
        with torch.no_grad():
            super().__init__(X, C, p)

    def jvp(self, T: Tensor) -> Tensor:
        with torch.no_grad():
            R = omega_apply(self.p.omega, T) + proj_jvp(self.X, self.Y, T, self._msa_jvp(T), self.p.osc_dim)
            return norm_residual_jvp_triton(self.norm, T, R, self.p.eta)

    def vjp(self, G: Tensor) -> Tensor:
        return self._vjp_chunked(G, super().vjp)
