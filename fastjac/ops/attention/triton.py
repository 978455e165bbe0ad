"""k-tangent attention JVP as one flash-attention-style Triton pass (``backend="triton"``).

Kernel ``_attn_jvp_fwd_kernel`` -> launcher ``attn_jvp_launch`` -> public ``msa_jvp_triton`` (and the forward alone,
``msa_forward_triton``). The strategy and the rescaling argument are in this folder's README.md; ``ref.py`` is the
readable reference (``msa_jvp``) that the tests hold this kernel to.

One program owns a tile of BM query rows of one (batch, head), KT tangents and BV value columns. It walks the key
tiles once with an online softmax and computes the probabilities p of a tile once for all KT tangents:

    acc_o  = sum_j p_ij v_j                                   [BM, BV]
    acc_t  = sum_j p_ij (vdot_tj + Ldot_tij v_j)              [KT, BM, BV]
    acc_l  = sum_j p_ij Ldot_tij                              [KT, BM]
    o = acc_o / l,   odot_t = acc_t / l - (acc_l / l) o

Every accumulator is a sum of p-weighted terms, so all of them are rescaled by the same exp(m_old - m_new) when the
running row maximum moves. Nothing of size S x S reaches global memory: memory is O(k S d).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._utils import INTERPRET, PRECISIONS, precision_for, pow2 as _pow2
from .ref import AttnParams, _out_proj, _project



@triton.jit
def _attn_jvp_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qd_ptr, kd_ptr, vd_ptr, o_ptr, od_ptr,
    S, DH, DV, H, K, beta,
    sq_b, sq_h, sq_s, sv_b, sv_h, sv_s,  # q and k share strides; v and o share strides (all last-dim contiguous)
    sqd_t, sqd_b, sqd_h, sqd_s, svd_t, svd_b, svd_h, svd_s,  # qd, kd share; vd, od share
    CAUSAL: tl.constexpr, HAS_T: tl.constexpr, STORE_O: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KT: tl.constexpr, BDH: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid_m, pid_bh, pid_tv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nv = tl.cdiv(DV, BV)
    pid_t, pid_v = pid_tv // nv, pid_tv % nv
    b, h = pid_bh // H, pid_bh % H
    rm = pid_m * BM + tl.arange(0, BM)  # query rows [BM]
    rd = tl.arange(0, BDH)  # [BDH]
    rv = pid_v * BV + tl.arange(0, BV)  # [BV]
    rt = pid_t * KT + tl.arange(0, KT)  # tangents [KT]
    m_ok, d_ok, v_ok, t_ok = rm < S, rd < DH, rv < DV, rt < K

    qo = b * sq_b + h * sq_h
    vo = b * sv_b + h * sv_h
    q = tl.load(q_ptr + qo + rm[:, None] * sq_s + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BDH]
    t3 = rt[:, None, None]
    if HAS_T:
        qdo = b * sqd_b + h * sqd_h
        vdo = b * svd_b + h * svd_h
        qd = tl.load(qd_ptr + qdo + t3 * sqd_t + rm[None, :, None] * sqd_s + rd[None, None, :],
                     mask=t_ok[:, None, None] & m_ok[None, :, None] & d_ok[None, None, :], other=0.0)  # [KT, BM, BDH]
        qd2 = tl.reshape(qd, (KT * BM, BDH))
        q3 = tl.broadcast_to(q[None, :, :], (KT, BM, BDH))

    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.zeros((BM,), ACC)
    acc_o = tl.zeros((BM, BV), ACC)
    acc_t = tl.zeros((KT, BM, BV), ACC)
    acc_l = tl.zeros((KT, BM), ACC)

    # causal: keys beyond the last row of this tile contribute nothing
    hi = tl.minimum(S, (pid_m + 1) * BM) if CAUSAL else S
    for j0 in range(0, hi, BN):
        rn = j0 + tl.arange(0, BN)  # keys [BN]
        n_ok = rn < S
        kT = tl.load(k_ptr + qo + rn[None, :] * sq_s + rd[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BDH, BN]
        v = tl.load(v_ptr + vo + rn[:, None] * sv_s + rv[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0)  # [BN, BV]
        s = beta * tl.dot(q, kT, input_precision=PREC, out_dtype=ACC)  # [BM, BN]
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        s = tl.where(keep, s, float("-inf"))
        # the first key tile holds key 0, which every row (even a padded one) may see: m_new is finite from then on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)  # [BM]
        p = tl.exp(s - m_new[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        if HAS_T:
            kdT = tl.load(kd_ptr + qdo + t3 * sqd_t + rn[None, None, :] * sqd_s + rd[None, :, None],
                          mask=t_ok[:, None, None] & d_ok[None, :, None] & n_ok[None, None, :], other=0.0)  # [KT, BDH, BN]
            vd = tl.load(vd_ptr + vdo + t3 * svd_t + rn[None, :, None] * svd_s + rv[None, None, :],
                         mask=t_ok[:, None, None] & n_ok[None, :, None] & v_ok[None, None, :], other=0.0)  # [KT, BN, BV]
            # Ldot = beta (qd k^T + q kd^T): the first product stacks the tangents on the rows, the second is batched
            ld = tl.reshape(tl.dot(qd2, kT, input_precision=PREC, out_dtype=ACC), (KT, BM, BN))
            ld = beta * (ld + tl.dot(q3, kdT, input_precision=PREC, out_dtype=ACC))  # [KT, BM, BN]
            p3 = tl.broadcast_to(p[None, :, :], (KT, BM, BN))
            pl = p3 * ld  # [KT, BM, BN]; zero wherever p is (masked keys)
            upd = tl.dot(p3.to(v.dtype), vd, input_precision=PREC, out_dtype=ACC)  # [KT, BM, BV]
            upd += tl.reshape(tl.dot(tl.reshape(pl, (KT * BM, BN)).to(v.dtype), v, input_precision=PREC,
                                     out_dtype=ACC), (KT, BM, BV))
            acc_t = acc_t * alpha[None, :, None] + upd
            acc_l = acc_l * alpha[None, :] + tl.sum(pl, 2)
        m_i = m_new

    o = acc_o / l_i[:, None]  # [BM, BV]
    if STORE_O:
        if pid_t == 0:
            tl.store(o_ptr + vo + rm[:, None] * sv_s + rv[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & v_ok[None, :])
    if HAS_T:
        od = acc_t / l_i[None, :, None] - (acc_l / l_i[None, :])[:, :, None] * o[None, :, :]  # [KT, BM, BV]
        tl.store(od_ptr + vdo + t3 * svd_t + rm[None, :, None] * svd_s + rv[None, None, :],
                 od.to(od_ptr.dtype.element_ty), mask=t_ok[:, None, None] & m_ok[None, :, None] & v_ok[None, None, :])


def default_blocks(dh: int, dv: int, k: int) -> Tuple[int, int, int, int]:
    """(BM, BN, KT, BV). Interpreter: 16-wide tiles (tests see ragged S). GPU: untuned defaults that keep the
    [KT, BM, BV] accumulator and the [KT, BM, BN] logit tangent near 8K floats each per program."""
    bv = min(_pow2(dv), 64)
    if INTERPRET:
        return 32, 32, min(triton.next_power_of_2(max(k, 1)), 8), bv
    kt = min(triton.next_power_of_2(max(k, 1)), 4)
    return (64 if kt == 1 else 32), 64, kt, bv


def attn_jvp_launch(q: Tensor, k: Tensor, v: Tensor, qd: Optional[Tensor], kd: Optional[Tensor],
                    vd: Optional[Tensor], beta: float, causal: bool, *, o: Optional[Tensor] = None,
                    od: Optional[Tensor] = None, precision: Optional[str] = None,
                    blocks: Optional[Tuple[int, int, int, int]] = None, num_warps: Optional[int] = None):
    """Launch ``_attn_jvp_fwd_kernel``. q, k [B, H, S, dh]; v [B, H, S, dv]; qd, kd [K, B, H, S, dh] and
    vd [K, B, H, S, dv], or all None (forward only). Writes o [B, H, S, dv] (if given) and od [K, B, H, S, dv]."""
    B, H, S, dh = q.shape
    dv = v.shape[-1]
    has_t = qd is not None
    K = qd.shape[0] if has_t else 1
    BM, BN, KT, BV = blocks if blocks is not None else default_blocks(dh, dv, K)
    BDH = _pow2(dh)
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    prec = precision_for(q.dtype, precision)
    if has_t:
        for name, t, ref in (("qd", qd, q), ("kd", kd, q)):
            if t.stride(-1) != 1 or t.stride() != qd.stride():
                raise ValueError(f"{name}: expected the layout of qd with a contiguous last dim")
        if vd.stride() != od.stride() or vd.stride(-1) != 1:
            raise ValueError("vd: expected vd and od to share a layout with a contiguous last dim")
    dummy = q
    grid = (triton.cdiv(S, BM), B * H, triton.cdiv(K, KT) * triton.cdiv(dv, BV))
    sqd = qd.stride()[:4] if has_t else (0, 0, 0, 0)
    svd = vd.stride()[:4] if has_t else (0, 0, 0, 0)
    extra = {} if num_warps is None else {"num_warps": num_warps}
    _attn_jvp_fwd_kernel[grid](
        q, k, v, qd if has_t else dummy, kd if has_t else dummy, vd if has_t else dummy,
        o if o is not None else dummy, od if has_t else dummy,
        S, dh, dv, H, K, float(beta),
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *sqd, *svd,
        CAUSAL=bool(causal), HAS_T=has_t, STORE_O=o is not None,
        BM=BM, BN=BN, KT=KT, BDH=BDH, BV=BV, PREC=prec, ACC=acc, **extra)
    return o, od


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v: expected [B, H, S, dh], [B, H, S, dh], [B, H, S, dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q: expected float32 or float64 for q, k, v alike, got {q.dtype}, {k.dtype}, {v.dtype}")


def attention_jvp_triton(q: Tensor, k: Tensor, v: Tensor, qd: Tensor, kd: Tensor, vd: Tensor, beta: float,
                         causal: bool, *, precision: Optional[str] = None,
                         blocks: Optional[Tuple[int, int, int, int]] = None) -> Tuple[Tensor, Tensor]:
    """Per-head attention output and its JVPs for K tangents, sharing one softmax.

    q, k [B, H, S, dh]; v [B, H, S, dv]; qd, kd [K, B, H, S, dh]; vd [K, B, H, S, dv].
    Returns (o [B, H, S, dv], od [K, B, H, S, dv]) with o = softmax(beta q k^T) v and od its derivative.

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
    o = torch.empty_like(v)
    od = torch.empty_like(vd)
    return attn_jvp_launch(q, k, v, qd, kd, vd, beta, causal, o=o, od=od, precision=precision, blocks=blocks)


def attention_forward_triton(q: Tensor, k: Tensor, v: Tensor, beta: float, causal: bool, *,
                             precision: Optional[str] = None,
                             blocks: Optional[Tuple[int, int, int, int]] = None) -> Tensor:
    """o = softmax(beta q k^T) v per head, flash style (no S x S tensor). q, k [B, H, S, dh]; v [B, H, S, dv]."""
    _check_qkv(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(v)
    attn_jvp_launch(q, k, v, None, None, None, beta, causal, o=o, precision=precision, blocks=blocks)
    return o


def msa_project(X: Tensor, p: AttnParams) -> Tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) per head from X [B, S, D]: [B, H, S, dh], [B, H, S, dh], [B, H, S, dv] (torch GEMMs)."""
    return _project(X, p.wq, p.bq).contiguous(), _project(X, p.wk, p.bk).contiguous(), \
        _project(X, p.wv, p.bv).contiguous()


def msa_forward_triton(X: Tensor, p: AttnParams, *, precision: Optional[str] = None):
    """MSA(X) with the flash forward kernel. X [B, S, D]. Returns (out [B, S, D], q, k, v, o) for reuse by JVPs.

    Example:
        >>> import fastjac as fj
        >>> m = fj.ItrSA(12, 3)
        >>> msa_forward_triton(torch.randn(1, 5, 12), m.attn_params())[0].shape   # doctest: +SKIP
        torch.Size([1, 5, 12])
    """
    q, k, v = msa_project(X, p)
    o = attention_forward_triton(q, k, v, p.beta, p.causal, precision=precision)
    out = _out_proj(o, p.wo)
    if p.bo is not None:
        out = out + p.bo
    return out, q, k, v, o


def msa_jvp_triton(p: AttnParams, q: Tensor, k: Tensor, v: Tensor, T: Tensor, *,
                   precision: Optional[str] = None, blocks: Optional[Tuple[int, int, int, int]] = None) -> Tensor:
    """d MSA[T] for K tangents T [K, B, S, D] at the state whose projections are q, k [B, H, S, dh], v [B, H, S, dv].

    The tangent projections (T Wq etc.) are torch GEMMs; the attention part is one kernel launch for all K
    tangents, which computes each tile of softmax probabilities once. Returns [K, B, S, D].

    Example:
        >>> import fastjac as fj
        >>> m = fj.ItrSA(12, 3); X = torch.randn(2, 5, 12)
        >>> q, k, v = msa_project(X, m.attn_params())
        >>> msa_jvp_triton(m.attn_params(), q, k, v, torch.randn(4, 2, 5, 12)).shape   # doctest: +SKIP
        torch.Size([4, 2, 5, 12])
    """
    if T.dim() != 4 or T.shape[1:3] != q.shape[0:1] + q.shape[2:3]:
        raise ValueError(f"T: expected [K, B, S, D] with B, S = {q.shape[0]}, {q.shape[2]}, got {tuple(T.shape)}")
    qd, kd, vd = _project(T, p.wq).contiguous(), _project(T, p.wk).contiguous(), _project(T, p.wv).contiguous()
    od = torch.empty_like(vd)
    attn_jvp_launch(q, k, v, qd, kd, vd, p.beta, p.causal, od=od, precision=precision, blocks=blocks)
    return _out_proj(od, p.wo)
