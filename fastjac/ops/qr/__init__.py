"""Orthonormalisation of tall-skinny matrices (CholeskyQR2 with a Householder fallback) for the Lyapunov iteration.

``ref.py``: the algorithm and torch primitives; ``triton.py``: fused kernels (Gram, apply+Gram, apply).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._checks import check_tensor
from .._utils import interpreter_on
from .ref import cholesky_qr2, householder_qr, shares_memory

try:  # Triton is optional (no wheels off Linux); the torch primitives always work
    from .triton import MAX_K, cholesky_qr2_triton
except Exception as e:  # pragma: no cover - depends on the install
    cholesky_qr2_triton, MAX_K, _TRITON_ERROR = None, 0, repr(e)
else:
    _TRITON_ERROR = None

QR_BACKENDS = ("auto", "triton", "torch", "householder")


def qr_backend(M: Tensor, backend: str = "auto") -> str:
    """The primitive set ``qr`` uses for M: "triton" on CUDA (k <= 128), "torch" elsewhere, or as requested."""
    if backend not in QR_BACKENDS:
        raise ValueError(f"backend: expected one of {QR_BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = cholesky_qr2_triton is not None and M.is_cuda and M.shape[-1] <= MAX_K
        return "triton" if ok else "torch"
    if backend == "triton":
        if cholesky_qr2_triton is None:
            raise ValueError(f"backend: 'triton' is not available ({_TRITON_ERROR})")
        if not (M.is_cuda or interpreter_on()):
            raise ValueError("backend: 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")
        if M.shape[-1] > MAX_K:
            raise ValueError(f"backend: the fused 'triton' QR takes k <= {MAX_K} columns, got {M.shape[-1]}")
        if M.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"M: the 'triton' QR takes float32 or float64, got {M.dtype}")
    return backend


class QRResult(tuple):
    """``(Q, logd)``, a 2-tuple whatever the flags; ``.fallback`` [...] bool marks the samples done by Householder."""

    def __new__(cls, Q: Tensor, logd: Tensor, fallback: Tensor):
        self = super().__new__(cls, (Q, logd))
        self.Q, self.logd, self.fallback = Q, logd, fallback
        return self


def qr(M: Tensor, *, backend: str = "auto", out: Optional[Tensor] = None) -> QRResult:
    """Orthonormalise the columns of tall-skinny matrices: ``M = Q R``, R upper triangular, diag R > 0.

    CholeskyQR2 (Gram matrix, Cholesky in float64, triangular apply; three reads of M, one write of Q), with a
    per-sample fallback to Householder (``torch.linalg.qr``) when the Gram matrix is too ill-conditioned or rank
    deficient to give an orthonormal Q (see ``fastjac/ops/qr/README.md``).

    Args:
        M: [..., n, k] with n >= k, float32 or float64, any strides.
        backend: "auto" (fused Triton kernels on CUDA, torch ops elsewhere), "triton", "torch" or "householder".
        out: optional [..., n, k] buffer (any strides) that receives Q; it may be M itself (then Q overwrites M).

    Returns:
        :class:`QRResult` ``(Q [..., n, k] in M's dtype, log|diag R| [..., k] float64)``; ``.fallback`` is the bool
        mask [...] of the samples that went to Householder.
        A column that is exactly dependent on the previous ones has log|R_ii| = -inf.

    Example:
        >>> import torch, fastjac as fj
        >>> M = torch.randn(3, 500, 8, dtype=torch.float64)
        >>> Q, logd = fj.ops.qr(M)
        >>> torch.allclose(Q.transpose(-1, -2) @ Q, torch.eye(8, dtype=torch.float64), atol=1e-12)
        True
        >>> R = Q.transpose(-1, -2) @ M
        >>> torch.allclose(R.diagonal(dim1=-2, dim2=-1).log(), logd)
        True
    """
    check_tensor("M", M)
    if M.dim() < 2:
        raise ValueError(f"M: expected shape [..., n, k], got {tuple(M.shape)}")
    n, k = M.shape[-2:]
    if k < 1 or n < k:
        raise ValueError(f"M: expected a tall-skinny [..., n, k] with n >= k >= 1, got n={n}, k={k}")
    if out is not None and (out.shape != M.shape or out.dtype != M.dtype or out.device != M.device):
        raise ValueError(f"out: expected a {M.dtype} tensor of shape {tuple(M.shape)} on {M.device}")
    kind = qr_backend(M, backend)
    batch = M.shape[:-2]
    M3 = M.reshape(-1, n, k)
    # M is read again after Q is written (second pass, Householder fallback): never hand the kernels an out that
    # aliases it; Q then goes to a fresh buffer and is copied into out at the end
    aliased = out is not None and shares_memory(out, M)
    out3 = None if out is None or aliased else out.view(-1, n, k) if out.dim() == 3 or out.is_contiguous() else None
    if kind == "householder":
        Q, logd = householder_qr(M3)
        bad = torch.ones(M3.shape[0], dtype=torch.bool, device=M.device)
    elif kind == "triton":
        Q, logd, bad = cholesky_qr2_triton(M3, out=out3)
    else:
        Q, logd, bad = cholesky_qr2(M3, out=out3)
    Q = Q.reshape(*batch, n, k)
    if out is not None and Q.data_ptr() != out.data_ptr():
        out.copy_(Q)
        Q = out
    return QRResult(Q, logd.reshape(*batch, k), bad.reshape(batch))


__all__ = ["QRResult", "qr", "qr_backend", "cholesky_qr2", "householder_qr", "QR_BACKENDS"]
