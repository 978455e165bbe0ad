"""Orthonormalisation of tall-skinny matrices for the Lyapunov (Benettin) iteration: CholeskyQR2 and Householder.

``M [..., n, k]`` (n >= k, any strides) -> ``Q [..., n, k]`` with orthonormal columns and ``log|diag R|`` [..., k]
in float64, R upper triangular with a positive diagonal (so ``M = Q R`` fixes Q uniquely for full-rank M).

CholeskyQR2 (Fukaya et al. 2014): ``R1 = chol(MᵀM)ᵀ``, ``Q1 = M R1⁻¹``; ``R2 = chol(Q1ᵀQ1)ᵀ``, ``Q = M (R2 R1)⁻¹``.
The k x k work (Cholesky, inverses, logs) runs in float64; the n-long work is three reads of M and one write of Q,
which is what the fused Triton kernels in ``triton.py`` do. Both share :func:`cholesky_qr2` and differ only in the
two primitives ``gram(M)`` and ``apply_gram(M, W)``.

Breakdown. CholeskyQR loses orthogonality like cond(M)² u. The second pass is accurate when Q1 is well conditioned,
which ``‖Q1ᵀQ1 − I‖_F <= 1/2`` guarantees (then cond(Q1) <= sqrt(3)); a sample that fails that test, or whose
Cholesky fails (rank loss: a normalised step maps radial directions to 0), is redone with Householder
(``torch.linalg.qr``) instead of returning a wrong Q. ``log|R_ii|`` of an exactly rank-deficient column is -inf.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

# ‖Q1ᵀQ1 − I‖_F above this sends a sample to Householder (see the module docstring)
ORTHO_TOL = 0.5


def shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors may overlap in memory (same storage: conservative, no false negatives)."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def gram_ref(M: Tensor) -> Tensor:
    """MᵀM [..., k, k] in M's dtype."""
    return M.transpose(-1, -2) @ M


def apply_gram_ref(M: Tensor, W: Tensor) -> Tensor:
    """(M W)ᵀ(M W) without keeping M W. W: [..., k, k] in M's dtype."""
    return gram_ref(M @ W)


def apply_ref(M: Tensor, W: Tensor, out: Tensor = None) -> Tensor:
    """M W [..., n, k], written into ``out`` if given."""
    if out is None:
        return M @ W
    if torch.is_grad_enabled() and (M.requires_grad or W.requires_grad):  # out= records no autograd
        return out.copy_(M @ W)
    return torch.matmul(M, W, out=out)


def _chol_upper(G: Tensor) -> Tuple[Tensor, Tensor]:
    """R upper with RᵀR = G (float64) and a per-sample success mask; failed samples get R = I."""
    L, info = torch.linalg.cholesky_ex(G.double())
    ok = (info == 0) & torch.isfinite(L).all(-1).all(-1) & (L.diagonal(dim1=-2, dim2=-1) > 0).all(-1)
    eye = torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)
    L = torch.where(ok[..., None, None], L, eye)
    return L.transpose(-1, -2), ok


def _inv_upper(R: Tensor) -> Tensor:
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def householder_qr(M: Tensor, out: Tensor = None) -> Tuple[Tensor, Tensor]:
    """Q and log|diag R| by ``torch.linalg.qr``, signs fixed so that diag R >= 0. M: [..., n, k]."""
    Q, R = torch.linalg.qr(M)
    d = R.diagonal(dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(Q.dtype)
    Q = Q * sign.unsqueeze(-2)
    logd = d.double().abs().log()
    if out is not None:
        out.copy_(Q)
        Q = out
    return Q, logd


def cholesky_qr2(
    M: Tensor,
    gram: Callable = gram_ref,
    apply_gram: Callable = apply_gram_ref,
    apply: Callable = apply_ref,
    out: Tensor = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """CholeskyQR2 of M [..., n, k] with the given n-long primitives; Householder for samples that break down.

    Returns (Q [..., n, k], log|diag R| [..., k] float64, fell_back [...] bool). ``out`` may be M itself (or share
    its memory): Q is then computed into a fresh buffer and copied, since M is read again after the apply.
    """
    if out is not None and shares_memory(out, M):
        Q, logd, bad = cholesky_qr2(M, gram, apply_gram, apply, out=None)
        return out.copy_(Q), logd, bad
    R1, ok1 = _chol_upper(gram(M))
    R1inv = _inv_upper(R1)
    G2 = apply_gram(M, R1inv.to(M.dtype)).double()
    eye = torch.eye(M.shape[-1], dtype=torch.float64, device=M.device)
    ok = ok1 & (torch.linalg.matrix_norm(G2 - eye) <= ORTHO_TOL)
    R2, ok2 = _chol_upper(G2)
    ok = ok & ok2
    W = (R1inv @ _inv_upper(R2)).to(M.dtype)  # (R2 R1)^-1
    Q = apply(M, W, out=out)
    logd = R1.diagonal(dim1=-2, dim2=-1).log() + R2.diagonal(dim1=-2, dim2=-1).log()
    bad = ~ok
    if bool(bad.any()):
        idx = bad.nonzero(as_tuple=True)
        Qh, lh = householder_qr(M[idx])
        Q[idx] = Qh
        logd[idx] = lh
    return Q, logd, bad
