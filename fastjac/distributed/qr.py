"""QR of a tangent matrix whose rows are split across ranks (token-parallel Lyapunov): distributed CholeskyQR2 and
a TSQR fallback.

Rank p holds the rows of its tokens, ``M_p [B, n_p, k]`` (n_p = S_p * D, possibly < k). The global matrix is
``M = [M_0; M_1; ...]`` in rank order, i.e. the token-major flattening of the full tangents.

CholeskyQR2. Each rank forms its k x k Gram ``M_pᵀ M_p``, one all-reduce (float64) sums them, every rank runs the
same float64 Cholesky on the same bytes and applies ``R⁻¹`` to its rows; a second pass does the same with Q1. So
``log|R_ii|`` (and the decision to fall back) is identical on every rank, and nothing of size n ever moves: two
all-reduces of B k² float64 per QR. Nothing requires n_p >= k: only the sum of the Grams must be positive definite.

Fallback (a sample whose Gram is too ill-conditioned, ``‖Q1ᵀQ1 − I‖_F > 1/2``, or whose Cholesky fails; or
``backend="householder"``): a one-level TSQR, not a gather of M. Each rank takes the Householder QR of its rows,
``M_p = Q_p R_p`` (R_p is min(n_p, k) x k), the small R_p are all-gathered (P k² numbers per sample), every rank
takes the Householder QR of the stacked ``[R_0; R_1; ...] = Q_s R`` and keeps ``Q_p Q_s[rows of p]``. R is
M's R factor (signs fixed so that diag R > 0), so the result is the one of a single-process Householder QR up to
rounding; the cost is one all-gather of P k² per sample, whatever n.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..ops.qr.ref import ORTHO_TOL, _chol_upper, _inv_upper
from . import _comm


def _gram(M: Tensor) -> Tensor:
    return M.transpose(-1, -2) @ M


def tsqr(M: Tensor, rows: Sequence[int], group) -> Tuple[Tensor, Tensor]:
    """Householder QR of the row-distributed M (this rank's rows ``M [B, n_p, k]``; ``rows[p]`` = n_p of rank p).

    Returns (Q [B, n_p, k] this rank's rows of Q, log|diag R| [B, k] float64, the same on every rank).
    """
    B, n_p, k = M.shape
    r, _ = _comm.rank_and_size(group)
    m = [min(n, k) for n in rows]
    Qp, Rp = torch.linalg.qr(M)  # reduced: [B, n_p, m_p], [B, m_p, k]
    Rs = _comm.all_gather_padded(Rp.transpose(0, 1).contiguous(), m, group, dim=0)  # P x [m_p, B, k]
    stacked = torch.cat(Rs, 0).transpose(0, 1)  # [B, sum m_p, k]
    Qs, R = torch.linalg.qr(stacked)  # [B, sum m_p, k], [B, k, k]
    off = sum(m[:r])
    Q = Qp @ Qs[:, off : off + m[r]]
    d = R.diagonal(dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign.unsqueeze(-2), d.double().abs().log()


def distributed_qr(M: Tensor, rows: Sequence[int], group, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """Orthonormalise the row-distributed tall-skinny M (this rank's rows ``M [B, n_p, k]``).

    Args:
        M: this rank's rows, float32 or float64. rows: n_p of every rank (their sum n >= k). group: the ranks.
        backend: "auto"/"torch" (CholeskyQR2, TSQR for the samples that break down) or "householder" (TSQR).

    Returns:
        (Q [B, n_p, k] this rank's rows, log|diag R| [B, k] float64 identical on every rank, fallback [B] bool).

    Example (needs a process group; a one-rank gloo group shows the call):
        >>> import os, torch, torch.distributed as dist  # doctest: +SKIP
        >>> dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:29511")  # doctest: +SKIP
        >>> Q, logd, fb = distributed_qr(torch.randn(1, 50, 4, dtype=torch.float64), [50], None)  # doctest: +SKIP
    """
    if backend not in ("auto", "torch", "triton", "householder"):
        raise ValueError(f"qr_backend: expected 'auto', 'torch' or 'householder', got {backend!r}")
    group = _comm.resolve_group(group, what="group")
    k = M.shape[-1]
    if sum(rows) < k:
        raise ValueError(f"M: the distributed matrix has {sum(rows)} rows, fewer than its k={k} columns")
    if backend == "householder":
        Q, logd = tsqr(M, rows, group)
        return Q, logd, torch.ones(M.shape[0], dtype=torch.bool, device=M.device)
    eye = torch.eye(k, dtype=torch.float64, device=M.device)
    G1 = _comm.all_reduce_sum(_gram(M).double(), group)
    R1, ok1 = _chol_upper(G1)
    R1inv = _inv_upper(R1)
    G2 = _comm.all_reduce_sum(_gram(M @ R1inv.to(M.dtype)).double(), group)
    ok = ok1 & (torch.linalg.matrix_norm(G2 - eye) <= ORTHO_TOL)
    R2, ok2 = _chol_upper(G2)
    ok = ok & ok2
    W = (R1inv @ _inv_upper(R2)).to(M.dtype)  # (R2 R1)^-1, the same on every rank
    Q = M @ W
    logd = R1.diagonal(dim1=-2, dim2=-1).log() + R2.diagonal(dim1=-2, dim2=-1).log()
    bad = ~ok
    if bool(bad.any()):  # the same samples on every rank (ok comes from all-reduced Grams): TSQR them
        idx = bad.nonzero(as_tuple=True)[0]
        Qh, lh = tsqr(M[idx], rows, group)
        Q[idx] = Qh
        logd[idx] = lh
    return Q, logd, bad


__all__ = ["distributed_qr", "tsqr"]
