"""Fused Triton primitives of CholeskyQR2 (``ref.py`` holds the algorithm and the breakdown rule).

A tall-skinny M [B, n, k] (k <= MAX_K, any strides) is read in row blocks of BLOCK_N x BLOCK_K. Three passes:
``gram`` (MᵀM), ``apply_gram`` ((M W)ᵀ(M W) without writing M W) and ``apply`` (Q = M W). Each Gram program sums
its row blocks in registers and writes one [BLOCK_K, BLOCK_K] partial; partials are summed in torch, in a fixed
order, so results are deterministic (no atomics), which the Lyapunov checkpoint/resume relies on.
Products run with ``input_precision="ieee"``: TF32 would spoil the Gram matrix that CholeskyQR squares. On a GPU,
BLOCK_N, num_warps and num_stages come from the verified launch table (``fastjac/ops/_launch.py``); the derivation
is in this folder's README.md.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _launch
from .ref import cholesky_qr2

MAX_K = 128  # larger k: the torch primitives (cuBLAS GEMMs are already efficient there)


@triton.jit(do_not_specialize=["n"])
def _qr_gram_kernel(M, W, P, n, k, s_mb, s_mn, s_mk, s_wb, s_pb, s_pc,
                    APPLY: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid, b, nprog = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_K)
    kmask = cols < k
    if APPLY:
        w = tl.load(W + b * s_wb + cols[:, None] * BLOCK_K + cols[None, :])  # [BK, BK], zero padded
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC)
    for start in range(pid * BLOCK_N, n, nprog * BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        a = tl.load(M + b * s_mb + rows[:, None] * s_mn + cols[None, :] * s_mk,
                    mask=(rows[:, None] < n) & kmask[None, :], other=0.0)  # [BN, BK]
        if APPLY:
            a = tl.dot(a, w, input_precision="ieee").to(a.dtype)
        acc += tl.dot(tl.trans(a), a, input_precision="ieee")
    tl.store(P + b * s_pb + pid * s_pc + cols[:, None] * BLOCK_K + cols[None, :], acc)


@triton.jit(do_not_specialize=["n"])
def _qr_apply_kernel(M, W, Q, n, k, s_mb, s_mn, s_mk, s_wb, s_qb, s_qn, s_qk,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n) & (cols[None, :] < k)
    a = tl.load(M + b * s_mb + rows[:, None] * s_mn + cols[None, :] * s_mk, mask=mask, other=0.0)  # [BN, BK]
    w = tl.load(W + b * s_wb + cols[:, None] * BLOCK_K + cols[None, :])  # [BK, BK]
    q = tl.dot(a, w, input_precision="ieee")
    tl.store(Q + b * s_qb + rows[:, None] * s_qn + cols[None, :] * s_qk, q.to(a.dtype), mask=mask)


def _blocks(k: int, kernel: str = "qr_gram", dtype: torch.dtype = torch.float32, device="cpu"):
    """(BLOCK_N, BLOCK_K, options): on a GPU the launch table's entry for BLOCK_K = pow2(k) (fastjac/ops/_launch.py);
    under the interpreter BLOCK_N x BLOCK_K near 8192 elements per tile."""
    BK = max(16, triton.next_power_of_2(k))
    arch = _launch.arch_of(device)
    if arch is None:
        return max(16, 8192 // BK), BK, {}
    _, cfg = _launch.config(kernel, arch, _launch.dtype_class(dtype), BK)
    return cfg["BLOCK_N"], BK, cfg.options()


def _pad_w(W: Tensor, BK: int) -> Tensor:
    k = W.shape[-1]
    Wp = torch.zeros(W.shape[0], BK, BK, dtype=W.dtype, device=W.device)
    Wp[:, :k, :k] = W
    return Wp


def qr_gram_launch(M: Tensor, W: Optional[Tensor] = None) -> Tensor:
    """MᵀM, or (M W)ᵀ(M W) when W [B, k, k] is given, for M [B, n, k]. Returns [B, k, k] in M's dtype."""
    B, n, k = M.shape
    BN, BK, opts = _blocks(k, "qr_gram" if W is None else "qr_gram_apply", M.dtype, M.device)
    nprog = max(1, min(triton.cdiv(n, BN), 256 if M.is_cuda else 4))
    P = torch.empty(B, nprog, BK, BK, dtype=M.dtype, device=M.device)
    Wp = _pad_w(W, BK) if W is not None else P  # P: a placeholder pointer, never read when APPLY is off
    _qr_gram_kernel[(nprog, B)](M, Wp, P, n, k, *M.stride(), Wp.stride(0), P.stride(0), P.stride(1),
                                APPLY=W is not None, ACC=tl.float64 if M.dtype == torch.float64 else tl.float32,
                                BLOCK_N=BN, BLOCK_K=BK, **opts)
    return P.sum(1)[:, :k, :k]


def qr_apply_launch(M: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """M W for M [B, n, k], W [B, k, k]; written into ``out`` [B, n, k] (any strides) if given."""
    B, n, k = M.shape
    BN, BK, opts = _blocks(k, "qr_apply", M.dtype, M.device)
    Q = torch.empty_like(M) if out is None else out
    Wp = _pad_w(W, BK)
    _qr_apply_kernel[(triton.cdiv(n, BN), B)](M, Wp, Q, n, k, *M.stride(), Wp.stride(0), *Q.stride(),
                                             BLOCK_N=BN, BLOCK_K=BK, **opts)
    return Q


def cholesky_qr2_triton(M: Tensor, out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """CholeskyQR2 of M [B, n, k] with the fused kernels; see ``ref.cholesky_qr2`` for the returns."""
    return cholesky_qr2(M, gram=qr_gram_launch, apply_gram=qr_gram_launch,
                        apply=lambda M_, W, out=None: qr_apply_launch(M_, W, out), out=out)
