"""One ItrSA / AKOrN step linearised on the Triton kernels (``backend="triton"``).

The forward runs the flash attention kernel once; every JVP is the k-tangent attention kernel
(``fastjac/ops/attention/triton.py``) followed by the fused residual + normalisation kernel
(``fastjac/ops/norm/triton.py``); the dense Jacobian is ``dense_triton.step_dense_triton``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._utils import INTERPRET, blockdiag as _blockdiag, group as _g
from ..akorn.ref import antisym, omega_apply, proj_jvp
from ..attention.ref import AttnCache, attention_probs
from ..attention.triton import msa_forward_triton, msa_jvp_triton
from ..norm.ref import NormCache, norm_left_apply
from ..norm.triton import norm_residual_jvp_triton
from .dense_triton import step_dense_triton
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
            return torch.cat([vjp_one(G[j:j + step]) for j in range(0, G.shape[0], step)])

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The step Jacobian [B, S*D, S*D], token-major, from ``_step_dense_fwd_kernel``."""
        return step_dense_triton(self, out)


class TritonItrSALinearization(_TritonAttention, ItrSALinearization):
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

    @property
    def _left(self):
        return None if self.p.norm.kind == "none" else self._norm_left

    def _norm_left(self, M: Tensor, b: int, i0: int) -> Tensor:
        return norm_left_apply(_sample(self.norm, b), M.unsqueeze(0), i0)[0]

    def _diag_E(self, Dg: Tensor, b: int, i0: int) -> Tensor:
        # E_i = N_i = L_i, so L_i Dg + E_i = L_i (Dg + I)
        Dg = Dg + torch.eye(Dg.shape[-1], dtype=Dg.dtype, device=Dg.device)
        return Dg if self._left is None else self._norm_left(Dg, b, i0)


class TritonAKOrNLinearization(_TritonAttention, AKOrNLinearization):
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
