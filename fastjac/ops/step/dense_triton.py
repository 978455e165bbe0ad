"""The dense step Jacobian on Triton: every element of [S*D, S*D] written once from small per-token factors.

Kernel ``_step_dense_fwd_kernel`` -> launcher ``step_dense_launch`` -> public ``step_dense_triton``.

Dense form (ref.py, README.md):  J_step[i, m] = eta L_i J_MSA[i, m] + delta_im E_i.  For an output row r = (i, a)
and column (m, b) the attention part is a sum over 2H terms,

    out[i, a, m, b] = sum_h  A_h[i, m] R1[i, h, a, b]  +  U[h, i, m, a] rb[i, h, b]   (+ Ed[i, a, b] if m == i)

    R1[i, h] = eta L_i (Wv_h Wo_h)^T                       [D, D]   (a token-independent matrix when L = I)
    U[h, i, m, a] = A_h[i, m] (L_i Wo_h^T (v_m - o_i))_a   [S, D]   per (h, i)
    rb[i, h] = eta beta Wk_h q_i                           [D]
    Ed[i] = L_i (eta beta sum_h Wo_h^T M_h[i] Wq_h^T) + E_i,  M_h[i] = sum_j A_ij (v_j - o_i) k_j^T

The small factors (O(S D^2 H + S^2 D H), built by torch GEMMs for a chunk of rows i) are expanded by the kernel
into a [BR rows, BM tokens, BB features] tile of the output with 2H fused multiply-adds per element and written
once: no S^2 D^2 intermediate, and the kernel's time is that of writing the output. bfloat16 / float16 factors are
accumulated in float32 and rounded once on the store. On a GPU the tiles and num_warps come from the verified launch
table (``fastjac/ops/_launch.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _launch
from .._utils import INTERPRET
from .factors import dense_factors, dense_out  # noqa: F401 - the factors the kernel expands (re-exported for tests)

# temporaries of one row chunk of the dense path (U, R1 and their einsum intermediates) stay near this many bytes
DENSE_FACTOR_BYTES = (32 if INTERPRET else 512) * 2**20


@triton.jit(do_not_specialize=["S", "H", "I", "i0"])
def _step_dense_fwd_kernel(
    a_ptr, r1_ptr, u_ptr, rb_ptr, e_ptr, out_ptr,
    S, D, H, I, i0, ld_out,
    sa_h, sa_i, sr_i, sr_h, sr_a, su_h, su_i, su_m, srb_i, srb_h, se_i,
    BR: tl.constexpr, BM: tl.constexpr, BB: tl.constexpr, F64: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32  # bfloat16 / float16 factors accumulate in float32
    rr = tl.program_id(0) * BR + tl.arange(0, BR)  # rows of this chunk, r = (i - i0) * D + a  [BR]
    rm = tl.program_id(1) * BM + tl.arange(0, BM)  # column tokens m  [BM]
    rc = tl.program_id(2) * BB + tl.arange(0, BB)  # column features b  [BB]
    il, a = rr // D, rr % D
    i = il + i0
    r_ok, m_ok, c_ok = rr < I * D, rm < S, rc < D
    ok_rm = r_ok[:, None] & m_ok[None, :]  # [BR, BM]
    ok_rc = r_ok[:, None] & c_ok[None, :]  # [BR, BB]
    acc = tl.zeros((BR, BM, BB), ACC)
    for h in range(H):
        av = tl.load(a_ptr + h * sa_h + i[:, None] * sa_i + rm[None, :], mask=ok_rm, other=0.0).to(ACC)  # [BR, BM]
        r1 = tl.load(r1_ptr + il[:, None] * sr_i + h * sr_h + a[:, None] * sr_a + rc[None, :], mask=ok_rc,
                     other=0.0).to(ACC)  # [BR, BB]
        uv = tl.load(u_ptr + h * su_h + il[:, None] * su_i + rm[None, :] * su_m + a[:, None], mask=ok_rm,
                     other=0.0).to(ACC)  # [BR, BM]
        rb = tl.load(rb_ptr + i[:, None] * srb_i + h * srb_h + rc[None, :], mask=ok_rc, other=0.0).to(ACC)  # [BR, BB]
        acc += av[:, :, None] * r1[:, None, :] + uv[:, :, None] * rb[:, None, :]
    ev = tl.load(e_ptr + il[:, None] * se_i + a[:, None] * D + rc[None, :], mask=ok_rc, other=0.0).to(ACC)  # [BR, BB]
    acc += tl.where(rm[None, :, None] == i[:, None, None], ev[:, None, :], 0.0)
    # int64: a dense Jacobian passes 2^31 elements at S*D ~ 46k
    off = (i0 * D + rr).to(tl.int64)[:, None, None] * ld_out + rm[None, :, None] * D + rc[None, None, :]
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None, None] & m_ok[None, :, None] & c_ok[None, None, :])


def _dense_blocks(D: int, dtype: torch.dtype = torch.float32, device="cpu"):
    """(BR, BM, BB, options): on a GPU the launch table's entry for the feature tile BB = min(64, pow2(D))
    (fastjac/ops/_launch.py); under the interpreter larger row tiles (fewer Python-level programs)."""
    BB = min(64, max(16, triton.next_power_of_2(D)))
    arch = _launch.arch_of(device)
    if arch is None:
        return 32, 16, min(32, BB), {}
    _, cfg = _launch.config("dense", arch, _launch.dtype_class(dtype), BB)
    return cfg["BR"], cfg["BM"], cfg["BB"], cfg.options()


def step_dense_launch(A: Tensor, R1: Tensor, U: Tensor, rb: Tensor, Ed: Tensor, out: Tensor, i0: int, i1: int,
                      blocks=None) -> None:
    """Launch ``_step_dense_fwd_kernel`` for one sample and the rows i in [i0, i1).

    A [H, S, S]; R1 [I, H, D, D] (stride 0 over I allowed); U [H, I, S, D]; rb [S, H, D]; Ed [I, D, D];
    out [S*D, S*D] (rows contiguous). All last dims contiguous.
    """
    H, S, _ = A.shape
    D, I = Ed.shape[-1], i1 - i0
    for name, t in (("A", A), ("R1", R1), ("U", U), ("rb", rb), ("Ed", Ed), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension")
    if blocks is not None and _launch.arch_of(out.device) is not None:
        raise ValueError("blocks: tile overrides are for the interpreter tests; on a GPU the launch table decides")
    BR, BM, BB, opts = (*blocks, {}) if blocks is not None else _dense_blocks(D, out.dtype, out.device)
    grid = (triton.cdiv(I * D, BR), triton.cdiv(S, BM), triton.cdiv(D, BB))
    _step_dense_fwd_kernel[grid](
        A, R1, U, rb, Ed, out, S, D, H, I, i0, out.stride(0),
        A.stride(0), A.stride(1), R1.stride(0), R1.stride(1), R1.stride(2), U.stride(0), U.stride(1), U.stride(2),
        rb.stride(0), rb.stride(1), Ed.stride(0),
        BR=BR, BM=BM, BB=BB, F64=out.dtype == torch.float64, **opts)


def step_dense_triton(lin, out: Optional[Tensor] = None) -> Tensor:
    """The dense step Jacobian [B, S*D, S*D] of a Triton linearisation, written by ``_step_dense_fwd_kernel``.

    ``lin`` provides ``attn`` (an AttnCache with A), ``p.eta``, ``_left`` and ``_diag_E`` (see dense_factors);
    ``out`` (contiguous rows) receives the result, every element written exactly once.

    Example:
        >>> import fastjac as fj
        >>> m = fj.ItrSA(8, 2)
        >>> fj.jacobian(m, torch.randn(5, 8), backend="triton").shape   # doctest: +SKIP
        torch.Size([40, 40])
    """
    X = lin.X
    B, S, D = X.shape
    out = dense_out(X, out)
    with torch.no_grad():
        H = lin.attn.A.shape[1]
        per_row = (4 * H * S * D + 3 * H * D * D + 3 * D * D) * X.element_size()
        chunk = max(1, min(S, DENSE_FACTOR_BYTES // per_row))
        for b in range(B):
            for i0 in range(0, S, chunk):
                i1 = min(S, i0 + chunk)
                step_dense_launch(*dense_factors(lin, b, i0, i1), out[b], i0, i1)
    return out


