"""Normalisation JVP fused with the residual update, as one Triton pass (``backend="triton"``).

Kernel ``_norm_jvp_fwd_kernel`` -> launcher ``norm_jvp_launch`` -> public ``norm_residual_jvp_triton``.

The step's tangent before the norm is ``Zdot = T + eta * R`` (ItrSA: R = dMSA[T]; AKOrN: R = Omega T + dProj); the
kernel forms it in registers and applies the norm's diagonal-plus-rank-one JVP (ref.py / README.md)

    y = gamma * ( u / s - w (w . u) / (alpha s^3) ),   u = Zdot (centred per group for "layer")

per group of N features, with w and s read from the forward cache, so every tangent is read and written once.
A tile is [BR rows, BG groups, BN features]: groups of any N (not only powers of two) are reduced along the last
axis under a mask. bfloat16 / float16 inputs are computed in float32 and rounded once on the store. On a GPU the
tile and num_warps come from the verified launch table (``fastjac/ops/_launch.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _launch
from .._utils import INTERPRET  # noqa: F401
from .ref import NormCache

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_KINDS = {"none": 0, "l2": 1, "rms": 2, "layer": 3}


@triton.jit(do_not_specialize=["R", "BS"])
def _norm_jvp_fwd_kernel(
    t_ptr, r_ptr, w_ptr, s_ptr, g_ptr, eta_ptr, out_ptr,
    R, BS, D, G, N, alpha,
    KIND: tl.constexpr, HAS_GAMMA: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
    F64: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32  # bfloat16 / float16 inputs compute in float32
    rr = tl.program_id(0) * BR + tl.arange(0, BR)  # tangent rows (k, b, s) [BR]
    rg = tl.arange(0, BG)
    rn = tl.arange(0, BN)
    col = rg[None, :, None] * N + rn[None, None, :]  # [1, BG, BN]
    ok = (rr[:, None, None] < R) & (rg[None, :, None] < G) & (rn[None, None, :] < N)  # [BR, BG, BN]
    off = rr[:, None, None] * D + col
    eta = tl.load(eta_ptr).to(ACC)
    u = tl.load(t_ptr + off, mask=ok, other=0.0).to(ACC) + eta * tl.load(r_ptr + off, mask=ok, other=0.0).to(ACC)
    if KIND != 0:
        cr = rr % BS  # the cache row of this tangent row: tangents [K, B, S] share the [B, S] statistics
        if KIND == 3:
            u = tl.where(ok, u - (tl.sum(u, 2) / N)[:, :, None], 0.0)
        w = tl.load(w_ptr + cr[:, None, None] * D + col, mask=ok, other=0.0).to(ACC)  # [BR, BG, BN]
        s = tl.load(s_ptr + cr[:, None] * G + rg[None, :], mask=(rr[:, None] < R) & (rg[None, :] < G),
                    other=1.0).to(ACC)  # [BR, BG]
        wu = tl.sum(w * u, 2)  # [BR, BG]
        u = u / s[:, :, None] - w * (wu / (alpha * s * s * s))[:, :, None]
        if HAS_GAMMA:
            u = u * tl.load(g_ptr + col, mask=(rg[None, :, None] < G) & (rn[None, None, :] < N), other=0.0).to(ACC)
    tl.store(out_ptr + off, u.to(out_ptr.dtype.element_ty), mask=ok)


def _blocks(G: int, N: int, dtype: torch.dtype = torch.float32, device="cpu"):
    """(BR, BG, BN, options): on a GPU from the launch table (bucket W = BG * BN, fastjac/ops/_launch.py); under
    the interpreter 8192 elements per program (each program costs milliseconds of Python there)."""
    BN, BG = triton.next_power_of_2(N), triton.next_power_of_2(G)
    arch = _launch.arch_of(device)
    if arch is None:
        return max(1, 8192 // (BN * BG)), BG, BN, {}
    _, cfg = _launch.config("norm", arch, _launch.dtype_class(dtype), BN * BG)
    return max(1, cfg["elems"] // (BN * BG)), BG, BN, cfg.options()


def norm_jvp_launch(c: NormCache, T: Tensor, R: Tensor, eta: Tensor, out: Tensor) -> Tensor:
    """Launch ``_norm_jvp_fwd_kernel``: out = dNorm[T + eta R]. T, R, out contiguous [K, B, S, D]; eta 0-dim."""
    p = c.params
    B, S, D = c.out.shape
    N = p.group
    G = D // N
    rows = T.numel() // D
    BR, BG, BN, opts = _blocks(G, N, T.dtype, T.device)
    kind = _KINDS[p.kind]
    dummy = T
    w = c.w.contiguous() if kind else dummy
    s = c.s.contiguous() if kind else dummy
    gam = p.gamma.contiguous() if (kind and p.gamma is not None) else dummy
    alpha = 1.0 if p.kind == "l2" else float(N)
    _norm_jvp_fwd_kernel[(triton.cdiv(rows, BR),)](
        T, R, w, s, gam, eta, out, rows, B * S, D, G, N, alpha,
        KIND=kind, HAS_GAMMA=bool(kind and p.gamma is not None), BR=BR, BG=BG, BN=BN,
        F64=T.dtype == torch.float64, **opts)
    return out


def norm_residual_jvp_triton(c: NormCache, T: Tensor, R: Tensor, eta, out: Optional[Tensor] = None) -> Tensor:
    """Tangent of ``Norm(X + eta (... ))``: ``dNorm[T + eta R]`` per group, fused in one pass.

    c: the norm's forward cache at Z [B, S, D] (``norm_cache``); T, R [K, B, S, D]; eta a number or 0-dim tensor.
    Returns [K, B, S, D] (or writes ``out``).

    Example:
        >>> from fastjac.ops.norm import NormParams, norm_cache
        >>> c = norm_cache(torch.randn(2, 5, 6), NormParams("layer", None, None, 1e-6, 3))
        >>> norm_residual_jvp_triton(c, torch.randn(4, 2, 5, 6), torch.randn(4, 2, 5, 6), 0.5).shape  # doctest: +SKIP
        torch.Size([4, 2, 5, 6])
    """
    if T.dim() != 4 or T.shape[1:] != c.out.shape or R.shape != T.shape:
        raise ValueError(f"T, R: expected [K, {', '.join(map(str, c.out.shape))}], got {tuple(T.shape)} and "
                         f"{tuple(R.shape)}")
    if T.dtype not in DTYPES or R.dtype != T.dtype:
        raise TypeError(f"T: expected float32, float64, bfloat16 or float16 for T and R alike, got {T.dtype}, "
                        f"{R.dtype}")
    if INTERPRET and T.dtype == torch.bfloat16:
        raise TypeError("T: bfloat16 does not run under the Triton interpreter (numpy has no bfloat16)")
    T, R = T.contiguous(), R.contiguous()
    acc = torch.float64 if T.dtype == torch.float64 else torch.float32  # eta in the accumulation dtype
    eta_t = torch.as_tensor(eta, device=T.device).detach().to(acc).reshape(())
    if out is None:
        out = torch.empty_like(T)
    elif out.shape != T.shape or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor of shape {tuple(T.shape)}, got {tuple(out.shape)}")
    return norm_jvp_launch(c, T, R, eta_t, out)
