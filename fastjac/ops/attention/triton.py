"""k-tangent attention JVP as a two-pass flash-attention-style Triton computation (``backend="triton"``).

Kernels ``_attn_fwd_kernel`` (forward: o and the row log-sum-exp) and ``_attn_jvp_fwd_kernel`` (tangent pass) ->
launchers ``attn_fwd_launch`` / ``attn_jvp_launch`` -> public ``attention_forward_triton``,
``attention_jvp_triton``, ``msa_forward_triton``, ``msa_jvp_triton``. The derivation, the design choice and the
resource numbers are in this folder's README.md; ``ref.py`` is the readable reference the tests hold these to.

The forward walks the key tiles once with an online softmax and saves, per query row, o_i and
lse_i = m_i + log l_i. The tangent pass then recomputes the probabilities exactly, p_ij = exp(beta q_i.k_j - lse_i)
(= A_ij: no running maximum, no rescaling), so every tangent accumulator is a plain sum over key tiles:

    acc_t = sum_j p_ij (vdot_tj + Ldot_tij v_j)     [BM, BV]      acc_l = sum_j p_ij Ldot_tij     [BM]
    odot_t = acc_t - acc_l o_i,     Ldot_tij = beta (qdot_ti.k_j + q_i.kdot_tj)

One program owns BM query rows of one (batch, head), ONE tangent and BV value columns: every tile is 2-D, which is
what makes the kernel fit the register file and shared memory at tensor-core tile sizes (the former [KT, BM, BN]
tiles did not). The softmax normalisation (max, sum, lse) and o are computed once, by the forward, for all k
tangents. Nothing of size S x S reaches global memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _launch
from .._utils import INTERPRET, PRECISIONS, precision_for  # noqa: F401 (PRECISIONS re-exported)
from .._utils import pow2 as _pow2
from .ref import AttnParams, _out_proj, _project

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float64) + HALF


@triton.jit(do_not_specialize=["S", "H"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    S, DH, DV, H, beta,
    sq_b, sq_h, sq_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,  # q and k share strides; all last dims contiguous
    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BDH: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, F64: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid_m, pid_bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    rm = pid_m * BM + tl.arange(0, BM)  # query rows [BM]
    rd = tl.arange(0, BDH)  # [BDH]
    rv = pid_v * BV + tl.arange(0, BV)  # [BV]
    m_ok, d_ok, v_ok = rm < S, rd < DH, rv < DV
    qo = b.to(tl.int64) * sq_b + h * sq_h
    vo = b.to(tl.int64) * sv_b + h * sv_h
    q = tl.load(q_ptr + qo + rm[:, None] * sq_s + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.zeros((BM,), ACC)
    acc = tl.zeros((BM, BV), ACC)
    hi = tl.minimum(S, (pid_m + 1) * BM) if CAUSAL else S  # causal: later keys contribute nothing
    for j0 in range(0, hi, BN):
        rn = j0 + tl.arange(0, BN)  # keys [BN]
        n_ok = rn < S
        kT = tl.load(k_ptr + qo + rn[None, :] * sq_s + rd[:, None], mask=d_ok[:, None] & n_ok[None, :],
                     other=0.0)  # [BDH, BN]
        v = tl.load(v_ptr + vo + rn[:, None] * sv_s + rv[None, :], mask=n_ok[:, None] & v_ok[None, :],
                    other=0.0)  # [BN, BV]
        s = tl.dot(q, kT, input_precision=PREC, out_dtype=ACC) * beta  # [BM, BN]
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        s = tl.where(keep, s, float("-inf"))
        # the first key tile holds key 0, which every row (even a padded one) sees: m_new is finite from then on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)  # [BM]
        p = tl.exp(s - m_new[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    o = acc / l_i[:, None]  # [BM, BV]
    tl.store(o_ptr + b.to(tl.int64) * so_b + h * so_h + rm[:, None] * so_s + rv[None, :],
             o.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])
    if pid_v == 0:
        tl.store(lse_ptr + pid_bh.to(tl.int64) * S + rm, (m_i + tl.log(l_i)).to(lse_ptr.dtype.element_ty),
                 mask=m_ok)


@triton.jit(do_not_specialize=["S", "H"])
def _attn_jvp_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, qd_ptr, kd_ptr, vd_ptr, od_ptr,
    S, DH, DV, H, beta,
    sq_b, sq_h, sq_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    sqd_t, sqd_b, sqd_h, sqd_s, svd_t, svd_b, svd_h, svd_s,  # qd, kd share strides; vd, od share strides
    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BDH: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, F64: tl.constexpr, DSPLIT: tl.constexpr,
):
    # DSPLIT = 2 splits the head dim into two halves of BDH / 2: the products over dh are two tl.dots each, which
    # halves the operand registers of FFMA (IEEE float32) and float64 products at BDH = 128
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    BDC: tl.constexpr = BDH // DSPLIT
    pid_m, pid_bh, pid_tv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nv = tl.cdiv(DV, BV)
    t, pid_v = pid_tv // nv, pid_tv % nv  # tangents on the grid: one per program
    b, h = pid_bh // H, pid_bh % H
    rm = pid_m * BM + tl.arange(0, BM)  # [BM]
    rd = tl.arange(0, BDC)  # [BDC]
    rv = pid_v * BV + tl.arange(0, BV)  # [BV]
    m_ok, d_ok, v_ok = rm < S, rd < DH, rv < DV
    qo = b.to(tl.int64) * sq_b + h * sq_h
    vo = b.to(tl.int64) * sv_b + h * sv_h
    qdo = t.to(tl.int64) * sqd_t + b.to(tl.int64) * sqd_b + h * sqd_h
    vdo = t.to(tl.int64) * svd_t + b.to(tl.int64) * svd_b + h * svd_h
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + qo + rm[:, None] * sq_s + rd[None, :], mask=md, other=0.0)  # [BM, BDC]
    qd = tl.load(qd_ptr + qdo + rm[:, None] * sqd_s + rd[None, :], mask=md, other=0.0)  # [BM, BDC]
    if DSPLIT == 2:
        d_ok1 = (rd + BDC) < DH
        md1 = m_ok[:, None] & d_ok1[None, :]
        q1 = tl.load(q_ptr + qo + rm[:, None] * sq_s + BDC + rd[None, :], mask=md1, other=0.0)  # [BM, BDC]
        qd1 = tl.load(qd_ptr + qdo + rm[:, None] * sqd_s + BDC + rd[None, :], mask=md1, other=0.0)
    # padded rows get lse = +inf, hence p = 0
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * S + rm, mask=m_ok, other=float("inf")).to(ACC)  # [BM]

    acc = tl.zeros((BM, BV), ACC)
    acc_l = tl.zeros((BM,), ACC)
    hi = tl.minimum(S, (pid_m + 1) * BM) if CAUSAL else S
    for j0 in range(0, hi, BN):
        rn = j0 + tl.arange(0, BN)
        n_ok = rn < S
        dn = d_ok[:, None] & n_ok[None, :]
        nv_ok = n_ok[:, None] & v_ok[None, :]
        kT = tl.load(k_ptr + qo + rn[None, :] * sq_s + rd[:, None], mask=dn, other=0.0)  # [BDC, BN]
        kdT = tl.load(kd_ptr + qdo + rn[None, :] * sqd_s + rd[:, None], mask=dn, other=0.0)  # [BDC, BN]
        s = tl.dot(q, kT, input_precision=PREC, out_dtype=ACC)  # [BM, BN]
        ld = tl.dot(qd, kT, input_precision=PREC, out_dtype=ACC)
        ld = tl.dot(q, kdT, ld, input_precision=PREC, out_dtype=ACC)
        if DSPLIT == 2:
            dn1 = d_ok1[:, None] & n_ok[None, :]
            kT1 = tl.load(k_ptr + qo + rn[None, :] * sq_s + BDC + rd[:, None], mask=dn1, other=0.0)
            kdT1 = tl.load(kd_ptr + qdo + rn[None, :] * sqd_s + BDC + rd[:, None], mask=dn1, other=0.0)
            s = tl.dot(q1, kT1, s, input_precision=PREC, out_dtype=ACC)
            ld = tl.dot(qd1, kT1, ld, input_precision=PREC, out_dtype=ACC)
            ld = tl.dot(q1, kdT1, ld, input_precision=PREC, out_dtype=ACC)
        s = s * beta
        ld = ld * beta  # Ldot [BM, BN]
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        p = tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None])  # = A_ij exactly, [BM, BN]
        pl = p * ld
        v = tl.load(v_ptr + vo + rn[:, None] * sv_s + rv[None, :], mask=nv_ok, other=0.0)  # [BN, BV]
        vd = tl.load(vd_ptr + vdo + rn[:, None] * svd_s + rv[None, :], mask=nv_ok, other=0.0)  # [BN, BV]
        acc = tl.dot(p.to(vd.dtype), vd, acc, input_precision=PREC, out_dtype=ACC)
        acc = tl.dot(pl.to(v.dtype), v, acc, input_precision=PREC, out_dtype=ACC)  # [BM, BV]
        acc_l += tl.sum(pl, 1)
    o = tl.load(o_ptr + b.to(tl.int64) * so_b + h * so_h + rm[:, None] * so_s + rv[None, :],
                mask=m_ok[:, None] & v_ok[None, :], other=0.0).to(ACC)  # [BM, BV]
    od = acc - acc_l[:, None] * o
    tl.store(od_ptr + vdo + rm[:, None] * svd_s + rv[None, :], od.to(od_ptr.dtype.element_ty),
             mask=m_ok[:, None] & v_ok[None, :])


def _interp_blocks(dv: int) -> Tuple[int, int, int]:
    # interpreter only: 64-wide tiles (each program costs milliseconds of Python there, and the tangent kernel runs
    # one program per tangent); S = 33 and 100 still give ragged tiles, and the kernel tests use 16-wide ones
    return 64, 64, min(_pow2(dv), 64)


def launch_config(kind: str, q: Tensor, dv: int, precision: Optional[str] = None,
                  blocks: Optional[Tuple[int, ...]] = None):
    """(BM, BN, BDH, BV, extra constexprs, options) for ``kind`` in {"attn_fwd", "attn_jvp"}: the launch table's
    entry on a GPU (``fastjac/ops/_launch.py``), small tiles under the interpreter (where the tangent kernel splits
    the head dim in two halves from BDH = 64 on, so the tests run that path too). ``blocks`` = (BM, BN, BV) or the
    former (BM, BN, KT, BV) overrides the tiles under the interpreter only: a GPU compiles nothing outside the table."""
    dh = q.shape[-1]
    arch = _launch.arch_of(q.device)
    if arch is None:
        if blocks is not None:
            BM, BN, BV = (blocks[0], blocks[1], blocks[-1])
        else:
            BM, BN, BV = _interp_blocks(dv)
        extra = {"DSPLIT": 2 if _pow2(dh) >= 64 else 1} if kind == "attn_jvp" else {}
        return BM, BN, _pow2(dh), BV, extra, {}
    if blocks is not None:
        raise ValueError("blocks: tile overrides are for the interpreter tests; on a GPU the verified launch table "
                         "(fastjac/ops/_launch.py) decides")
    dc = _launch.dtype_class(q.dtype, precision_for(q.dtype, precision))
    BDH, cfg = _launch.config(kind, arch, dc, _pow2(dh))
    extra = {"DSPLIT": dict(cfg.tiles).get("DSPLIT", 1)} if kind == "attn_jvp" else {}
    return cfg["BM"], cfg["BN"], BDH, cfg["BV"], extra, cfg.options()


def default_blocks(dh: int, dv: int, k: int = 1) -> Tuple[int, int, int, int]:
    """(BM, BN, 1, BV) of the tangent kernel under the interpreter (kept for callers of the former API; on a GPU
    the tiles come from the launch table, ``launch_config``)."""
    BM, BN, BV = _interp_blocks(dv)
    return BM, BN, 1, BV


def attn_fwd_launch(q: Tensor, k: Tensor, v: Tensor, beta: float, causal: bool, o: Tensor, lse: Tensor, *,
                    precision: Optional[str] = None, blocks: Optional[Tuple[int, ...]] = None) -> None:
    """Launch ``_attn_fwd_kernel``: o [B, H, S, dv] (any float dtype, last dim contiguous) and lse [B, H, S]
    (contiguous, float32, float64 for float64 inputs). q, k [B, H, S, dh], v [B, H, S, dv], last dims contiguous."""
    B, H, S, dh = q.shape
    dv = v.shape[-1]
    BM, BN, BDH, BV, _, opts = launch_config("attn_fwd", q, dv, precision, blocks)
    grid = (triton.cdiv(S, BM), B * H, triton.cdiv(dv, BV))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, S, dh, dv, H, float(beta),
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        CAUSAL=bool(causal), BM=BM, BN=BN, BDH=BDH, BV=BV, PREC=precision_for(q.dtype, precision),
        F64=q.dtype == torch.float64, **opts)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attn_jvp_launch(q: Tensor, k: Tensor, v: Tensor, qd: Optional[Tensor], kd: Optional[Tensor],
                    vd: Optional[Tensor], beta: float, causal: bool, *, o: Optional[Tensor] = None,
                    od: Optional[Tensor] = None, precision: Optional[str] = None,
                    blocks: Optional[Tuple[int, ...]] = None, num_warps: Optional[int] = None,
                    o_acc: Optional[Tensor] = None, lse: Optional[Tensor] = None):
    """Attention forward and/or K-tangent JVP. q, k [B, H, S, dh]; v [B, H, S, dv]; qd, kd [K, B, H, S, dh] and
    vd [K, B, H, S, dv], or all None (forward only). Writes o [B, H, S, dv] (if given) and od [K, B, H, S, dv].

    ``o_acc`` (o in the accumulation dtype) and ``lse`` [B, H, S] from an earlier forward skip the forward launch;
    otherwise ``_attn_fwd_kernel`` runs once here and its statistics serve all K tangents. Returns (o, od).
    ``num_warps`` is accepted for backward compatibility and must be None on a GPU (the launch table decides)."""
    if num_warps is not None and _launch.arch_of(q.device) is not None:
        raise ValueError("num_warps: the verified launch table decides on a GPU")
    B, H, S, dh = q.shape
    dv = v.shape[-1]
    has_t = qd is not None
    if o_acc is None or lse is None:
        acc_dt = _acc_dtype(q.dtype)
        o_acc = o if (o is not None and o.dtype == acc_dt and o.stride(-1) == 1) else \
            torch.empty(B, H, S, dv, dtype=acc_dt, device=q.device)
        lse = torch.empty(B, H, S, dtype=acc_dt, device=q.device)
        attn_fwd_launch(q, k, v, beta, causal, o_acc, lse, precision=precision, blocks=blocks)
    if o is not None and o.data_ptr() != o_acc.data_ptr():
        o.copy_(o_acc)
    if not has_t:
        return o, od
    for name, t in (("qd", qd), ("kd", kd)):
        if t.stride(-1) != 1 or t.stride() != qd.stride():
            raise ValueError(f"{name}: expected the layout of qd with a contiguous last dim")
    if vd.stride() != od.stride() or vd.stride(-1) != 1:
        raise ValueError("vd: expected vd and od to share a layout with a contiguous last dim")
    K = qd.shape[0]
    BM, BN, BDH, BV, extra, opts = launch_config("attn_jvp", q, dv, precision, blocks)
    grid = (triton.cdiv(S, BM), B * H, K * triton.cdiv(dv, BV))
    _attn_jvp_fwd_kernel[grid](
        q, k, v, o_acc, lse, qd, kd, vd, od, S, dh, dv, H, float(beta),
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o_acc.stride(0), o_acc.stride(1), o_acc.stride(2),
        *qd.stride()[:4], *vd.stride()[:4],
        CAUSAL=bool(causal), BM=BM, BN=BN, BDH=BDH, BV=BV, PREC=precision_for(q.dtype, precision),
        F64=q.dtype == torch.float64, **extra, **opts)
    return o, od


def attn_flops(S: int, dh: int, dv: int, k: int, *, B: int = 1, H: int = 1, causal: bool = False,
               BV: Optional[int] = None) -> dict:
    """Multiply-add FLOPs (2 per MAC) of the attention part of one k-tangent JVP call, this design against the
    one-tangent-per-call baseline (a JVP-flash kernel that redoes the forward for every tangent) and against the
    former shared-softmax kernel with [KT, BM, BN] tiles. ``two_pass`` counts the forward launch too;
    ``two_pass_cached_forward`` is a ``jvp_fn(T)`` call after ``fj.linearize`` (forward already done). Causal halves
    every term (``causal=True``)."""
    nv = 1 if BV is None else -(-dv // BV)  # the tangent pass recomputes q.k^T once per value tile
    pairs = B * H * S * S * (0.5 if causal else 1.0)
    fwd = 2 * pairs * (dh + dv)
    per_tangent = 2 * pairs * (3 * dh * nv + 2 * dv)  # q.k^T (recompute), qd.k^T, q.kd^T; p vd, (p Ldot) v
    ours = fwd + k * per_tangent
    baseline = k * (fwd + 2 * pairs * (2 * dh + 2 * dv))
    shared = fwd + k * 2 * pairs * (2 * dh + 2 * dv)
    return dict(two_pass=ours, two_pass_cached_forward=k * per_tangent, one_tangent_per_call=baseline,
                shared_softmax_3d=shared, ratio_vs_baseline=ours / baseline)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v: expected [B, H, S, dh], [B, H, S, dh], [B, H, S, dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q: expected float32, float64, bfloat16 or float16 for q, k, v alike, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    check_dtype_runs(q.dtype)


def check_dtype_runs(dtype: torch.dtype) -> None:
    """bfloat16 cannot run under the interpreter (numpy has no bfloat16: results would be garbage), so refuse."""
    if INTERPRET and dtype == torch.bfloat16:
        raise TypeError("q: bfloat16 does not run under the Triton interpreter (numpy has no bfloat16); its kernels "
                        "are verified by compilation only (python -m fastjac aot)")


def _forward(q: Tensor, k: Tensor, v: Tensor, beta: float, causal: bool, precision, blocks):
    B, H, S, _ = q.shape
    acc_dt = _acc_dtype(q.dtype)
    o_acc = torch.empty(B, H, S, v.shape[-1], dtype=acc_dt, device=q.device)
    lse = torch.empty(B, H, S, dtype=acc_dt, device=q.device)
    attn_fwd_launch(q, k, v, beta, causal, o_acc, lse, precision=precision, blocks=blocks)
    return o_acc, lse


def attention_jvp_triton(q: Tensor, k: Tensor, v: Tensor, qd: Tensor, kd: Tensor, vd: Tensor, beta: float,
                         causal: bool, *, precision: Optional[str] = None,
                         blocks: Optional[Tuple[int, ...]] = None) -> Tuple[Tensor, Tensor]:
    """Per-head attention output and its JVPs for K tangents, sharing one softmax (one forward, then the tangent
    pass on the saved log-sum-exp).

    q, k [B, H, S, dh]; v [B, H, S, dv]; qd, kd [K, B, H, S, dh]; vd [K, B, H, S, dv]; float32, float64, float16
    or bfloat16 (accumulation in float32, float64 for float64). Returns (o [B, H, S, dv], od [K, B, H, S, dv]) in
    the input dtype, with o = softmax(beta q k^T) v and od its derivative.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
        >>> o, od = attention_jvp_triton(q, k, v, *(torch.randn(3, 1, 2, 7, 4) for _ in range(3)), 0.5, False)
        >>> od.shape
        torch.Size([3, 1, 2, 7, 4])
    """
    _check_qkv(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qd, kd, vd = qd.contiguous(), kd.contiguous(), vd.contiguous()
    if qd.shape[1:] != q.shape or kd.shape != qd.shape or vd.shape[1:] != v.shape or vd.shape[0] != qd.shape[0]:
        raise ValueError(f"qd, kd, vd: expected [K, *q.shape], [K, *q.shape], [K, *v.shape], got {tuple(qd.shape)}, "
                         f"{tuple(kd.shape)}, {tuple(vd.shape)}")
    if qd.dtype != q.dtype or kd.dtype != q.dtype or vd.dtype != q.dtype:
        raise TypeError(f"qd, kd, vd: expected {q.dtype} like q, got {qd.dtype}, {kd.dtype}, {vd.dtype}")
    o_acc, lse = _forward(q, k, v, beta, causal, precision, blocks)
    od = torch.empty_like(vd)
    attn_jvp_launch(q, k, v, qd, kd, vd, beta, causal, od=od, precision=precision, blocks=blocks,
                    o_acc=o_acc, lse=lse)
    return o_acc.to(q.dtype), od


def attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, beta: float, causal: bool, *,
                             precision: Optional[str] = None,
                             blocks: Optional[Tuple[int, ...]] = None) -> Tensor:
    """o = softmax(beta q k^T) v per head, flash style (no S x S tensor). q, k [B, H, S, dh]; v [B, H, S, dv]."""
    _check_qkv(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _forward(q, k, v, beta, causal, precision, blocks)[0].to(q.dtype)


def msa_project(X: Tensor, p: AttnParams) -> Tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) per head from X [B, S, D]: [B, H, S, dh], [B, H, S, dh], [B, H, S, dv] (torch GEMMs)."""
    return _project(X, p.wq, p.bq).contiguous(), _project(X, p.wk, p.bk).contiguous(), \
        _project(X, p.wv, p.bv).contiguous()


# The forward's statistics travel with q: msa_forward_triton attaches (o in the accumulation dtype, lse, the
# settings they were computed with, q's version counter) to the q it returns, and msa_jvp_triton reuses them when
# they still match, so a linearisation pays one forward for all its JVP calls. Otherwise the JVP runs the forward.
_FWD_ATTR = "_fastjac_attn_fwd"


def _saved_forward(q: Tensor, k: Tensor, v: Tensor, p: AttnParams, precision):
    saved = getattr(q, _FWD_ATTR, None)
    key = (q._version, k.data_ptr(), k._version, v.data_ptr(), v._version, float(p.beta), bool(p.causal),
           precision_for(q.dtype, precision))
    if saved is not None and saved[0] == key:
        return saved[1], saved[2]
    return None, None


def msa_forward_triton(X: Tensor, p: AttnParams, *, precision: Optional[str] = None):
    """MSA(X) with the flash forward kernel. X [B, S, D]. Returns (out [B, S, D], q, k, v, o) for reuse by JVPs
    (q carries the forward's log-sum-exp, so ``msa_jvp_triton`` on these q, k, v runs no second forward).

    Example:
        >>> import fastjac as fj
        >>> m = fj.ItrSA(12, 3)
        >>> msa_forward_triton(torch.randn(1, 5, 12), m.attn_params())[0].shape   # doctest: +SKIP
        torch.Size([1, 5, 12])
    """
    q, k, v = msa_project(X, p)
    _check_qkv(q, k, v)
    o_acc, lse = _forward(q, k, v, p.beta, p.causal, precision, None)
    key = (q._version, k.data_ptr(), k._version, v.data_ptr(), v._version, float(p.beta), bool(p.causal),
           precision_for(q.dtype, precision))
    setattr(q, _FWD_ATTR, (key, o_acc, lse))
    o = o_acc.to(q.dtype)
    out = _out_proj(o, p.wo)
    if p.bo is not None:
        out = out + p.bo
    return out, q, k, v, o


def msa_jvp_triton(p: AttnParams, q: Tensor, k: Tensor, v: Tensor, T: Tensor, *,
                   precision: Optional[str] = None, blocks: Optional[Tuple[int, ...]] = None) -> Tensor:
    """d MSA[T] for K tangents T [K, B, S, D] at the state whose projections are q, k [B, H, S, dh], v [B, H, S, dv].

    The tangent projections (T Wq etc.) are torch GEMMs; the attention part is the tangent kernel on the
    forward's saved statistics (from ``msa_forward_triton``; recomputed by one forward launch if q carries none),
    so the softmax normalisation is computed once for all K tangents. Returns [K, B, S, D].

    Example:
        >>> import fastjac as fj
        >>> m = fj.ItrSA(12, 3); X = torch.randn(2, 5, 12)
        >>> q, k, v = msa_project(X, m.attn_params())
        >>> msa_jvp_triton(m.attn_params(), q, k, v, torch.randn(4, 2, 5, 12)).shape   # doctest: +SKIP
        torch.Size([4, 2, 5, 12])
    """
    if T.dim() != 4 or T.shape[1:3] != q.shape[0:1] + q.shape[2:3]:
        raise ValueError(f"T: expected [K, B, S, D] with B, S = {q.shape[0]}, {q.shape[2]}, got {tuple(T.shape)}")
    _check_qkv(q, k, v)
    qd, kd, vd = _project(T, p.wq).contiguous(), _project(T, p.wk).contiguous(), _project(T, p.wv).contiguous()
    o_acc, lse = (None, None) if blocks is not None else _saved_forward(q, k, v, p, precision)
    if o_acc is None:
        o_acc, lse = _forward(q, k, v, p.beta, p.causal, precision, blocks)
    od = torch.empty_like(vd)
    attn_jvp_launch(q, k, v, qd, kd, vd, p.beta, p.causal, od=od, precision=precision, blocks=blocks,
                    o_acc=o_acc, lse=lse)
    return _out_proj(od, p.wo)
