"""Attention on the compiled C++ kernels (``backend="cpp"``): a flash-tiled forward and k-tangent JVP.

Kernels ``flash_fwd`` / ``flash_jvp_k`` (csrc/flash_attn.cpp) -> custom ops ``torch.ops.fastjac.flash_fwd`` /
``torch.ops.fastjac.flash_jvp`` -> public ``flash_forward``, ``flash_jvp`` (q/k/v level, the interface the
JVP-capable SDPA calls on the CPU), ``flash_available``, and the model-level ``msa_forward_cpp`` /
``msa_jvp_cpp``. The algebra is in this folder's README.md ("C++ flash kernels"): the forward walks key tiles with
an online softmax and saves the row log-sum-exp; the tangent pass recomputes ``p_ij = exp(s_ij - lse_i)`` exactly
per [BM, BN] tile and shares it between all K tangents,

    odot_ti = sum_j p_ij vdot_tj + scale [ sum_j W_tij v_j - (sum_j W_tij) o_i ],
    W_tij = p_ij (qdot_ti.k_j + q_i.kdot_tj),

so nothing of size L x S is ever allocated (only the caller's own bias, if any). Tile sizes: ``block_m`` /
``block_n`` arguments, else ``FASTJAC_CPP_FLASH_TILES="BM,BN"`` (tests force tiny tiles with it), else the kernel's
L2-sized default. Not differentiable in the inputs' graph (the ops are leaves for autograd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .ref import AttnParams, _out_proj, _project

DTYPES = (torch.float32, torch.float64)
_available: dict = {}


def _tiles(block_m: int, block_n: int) -> Tuple[int, int]:
    env = os.environ.get("FASTJAC_CPP_FLASH_TILES")
    if env and not (block_m or block_n):
        try:
            bm, bn = (int(x) for x in env.split(","))
        except ValueError:
            raise ValueError(f"FASTJAC_CPP_FLASH_TILES: expected 'BM,BN' (two integers), got {env!r}") from None
        return bm, bn
    return int(block_m), int(block_n)


def flash_available(build: bool = False) -> Optional[str]:
    """None when the C++ flash ops can run in this process, else the reason (cheap after the first call).

    The library is loaded from the build cache if it is there; ``build=True`` compiles it when it is not (about a
    minute on 2 cores), otherwise a missing build is a reason (``python -m fastjac build`` makes one).

    Example:
        >>> from fastjac.ops.attention import cpp
        >>> cpp.flash_available() is None or isinstance(cpp.flash_available(), str)
        True
    """
    if None in _available:
        return None
    # the backend owns building and loading the library; the op layer only asks it (lazily: no import cycle)
    from ...backends import cpp as _be

    if _be.is_loaded():  # e.g. loaded by backend="cpp" after an earlier call here said it was not built
        _available[None] = True
        return None
    if build in _available:
        return _available[build]
    try:
        _be.load(build=build)
        _available[None] = True
        return None
    except RuntimeError as e:
        _available[build] = str(e)
        return _available[build]


def _ops():
    from .._utils import compiled_ops

    return compiled_ops()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected [B, H, len, dim], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES or t.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU float32/float64 tensor, got {t.dtype} on {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")


def flash_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool,
    bias: Optional[Tensor] = None,
    block_m: int = 0,
    block_n: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Softmax attention o = softmax(scale q k^T + bias) v and the row log-sum-exp, flash-tiled on the CPU.

    q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev] (float32/float64, any strides); ``bias`` an additive float mask
    broadcastable to [B, H, L, S] (-inf allowed; expanded views are read in place); ``causal``: key j allowed iff
    j <= i (top-left aligned, also for L != S). Returns o [B, H, L, Ev] and lse [B, H, L] (q's dtype). A fully
    masked row gives o = 0 and lse = -inf. No [L, S] buffer is allocated.

    Example:
        >>> import torch
        >>> from fastjac.ops.attention.cpp import flash_forward
        >>> q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)
        >>> o, lse = flash_forward(q, k, v, scale=0.5, causal=False)  # doctest: +SKIP
        >>> o.shape, lse.shape  # doctest: +SKIP
        (torch.Size([1, 2, 5, 3]), torch.Size([1, 2, 5]))
    """
    _check_qkv(q, k, v)
    bm, bn = _tiles(block_m, block_n)
    return _ops().flash_fwd(q, k, v, float(scale), bool(causal), bias, bm, bn)


def flash_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    qd: Tensor,
    kd: Tensor,
    vd: Tensor,
    *,
    scale: float,
    causal: bool,
    bias: Optional[Tensor] = None,
    block_m: int = 0,
    block_n: int = 0,
) -> Tensor:
    """K tangents of flash attention at once: od [K, B, H, L, Ev] for qd [K, B, H, L, E], kd [K, B, H, S, E],
    vd [K, B, H, S, Ev], given the forward's o and lse (``flash_forward``). The bias has no tangent. 0 on fully
    masked rows. All K tangents share each recomputed [BM, BN] tile of p; no [L, S] buffer is allocated.

    The result is a permuted view of a token-major [K, B, L, H, Ev] buffer (``.contiguous()`` if you need one).

    Example:
        >>> import torch
        >>> from fastjac.ops.attention.cpp import flash_forward, flash_jvp
        >>> q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)
        >>> o, lse = flash_forward(q, k, v, scale=0.5, causal=True)  # doctest: +SKIP
        >>> T = lambda t: torch.randn(3, *t.shape)
        >>> flash_jvp(q, k, v, o, lse, T(q), T(k), T(v), scale=0.5, causal=True).shape  # doctest: +SKIP
        torch.Size([3, 1, 2, 5, 3])
    """
    _check_qkv(q, k, v)
    for name, t, ref in (("qd", qd, q), ("kd", kd, k), ("vd", vd, v)):
        if not isinstance(t, Tensor) or t.dim() != 5 or t.shape[1:] != ref.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected [K, {', '.join(map(str, ref.shape))}], got {shape}")
    if not (qd.shape[0] == kd.shape[0] == vd.shape[0]):
        raise ValueError(
            f"qd, kd, vd: expected the same number of tangents, got {qd.shape[0]}, {kd.shape[0]}, {vd.shape[0]}"
        )
    bm, bn = _tiles(block_m, block_n)
    od = _ops().flash_jvp(q, k, v, o, lse, qd, kd, vd, float(scale), bool(causal), bias, bm, bn)
    return od.permute(0, 1, 3, 2, 4)


# ------------------------------------------------------------------------------------------------ model level


@dataclass
class FlashAttnCache:
    """What the cpp JVP and dense writer keep from the forward: q, k [B, H, S, dh], v, o [B, H, S, dv],
    lse [B, H, S] (no probabilities), out = MSA(X) [B, S, D]."""

    params: AttnParams
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    lse: Tensor
    out: Tensor


def msa_forward_cpp(X: Tensor, p: AttnParams) -> FlashAttnCache:
    """MSA(X) for X [B, S, D] by the flash forward, keeping q, k, v, o and lse for the JVPs.

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(12, 3)
        >>> msa_forward_cpp(torch.randn(2, 5, 12), m.attn_params()).out.shape  # doctest: +SKIP
        torch.Size([2, 5, 12])
    """
    q = _project(X, p.wq, p.bq).contiguous()
    k = _project(X, p.wk, p.bk).contiguous()
    v = _project(X, p.wv, p.bv).contiguous()
    o, lse = flash_forward(q, k, v, scale=p.beta, causal=p.causal)
    out = _out_proj(o, p.wo)
    if p.bo is not None:
        out = out + p.bo
    return FlashAttnCache(p, q, k, v, o, lse, out)


def qkv_weight(p: AttnParams) -> Tensor:
    """Wq, Wk, Wv of every head side by side: [D, H * (2 dh + dv)], columns (h, [q | k | v])."""
    W = torch.cat([p.wq, p.wk, p.wv], -1)  # [H, D, 2dh+dv]
    return W.permute(1, 0, 2).reshape(W.shape[1], -1)


def msa_jvp_cpp(c: FlashAttnCache, T: Tensor, *, wqkv: Optional[Tensor] = None) -> Tensor:
    """d MSA[T] for K tangents T [K, B, S, D] at the state cached in ``c`` (``msa_forward_cpp``). Returns
    [K, B, S, D]. ``wqkv`` is ``qkv_weight(c.params)`` if the caller keeps it across calls.

    The tangent projections T [Wq|Wk|Wv] are one BLAS GEMM (the op reads the strided [K, B, H, S, .] views in
    place), the output projection one GEMM by Wo on the op's token-major result. Not differentiable in the weights.

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(12, 3); X = torch.randn(2, 5, 12)
        >>> msa_jvp_cpp(msa_forward_cpp(X, m.attn_params()), torch.randn(4, 2, 5, 12)).shape  # doctest: +SKIP
        torch.Size([4, 2, 5, 12])
    """
    p = c.params
    if T.dim() != 4 or T.shape[1:] != c.out.shape:
        raise ValueError(f"T: expected [K, {', '.join(map(str, c.out.shape))}], got {tuple(T.shape)}")
    K, B, S, D = T.shape
    H, dh, dv = p.heads, p.wq.shape[-1], p.wv.shape[-1]
    W = qkv_weight(p) if wqkv is None else wqkv
    P = (T.reshape(K * B * S, D) @ W).view(K, B, S, H, 2 * dh + dv).permute(0, 1, 3, 2, 4)  # [K, B, H, S, .]
    qd, kd, vd = P[..., :dh], P[..., dh : 2 * dh], P[..., 2 * dh :]
    bm, bn = _tiles(0, 0)
    od = _ops().flash_jvp(c.q, c.k, c.v, c.o, c.lse, qd, kd, vd, float(p.beta), bool(p.causal), None, bm, bn)
    if p.wo is None:  # od: [K, B, S, H, dv]
        return od.sum(-2)
    return (od.view(K * B * S, H * dv) @ p.wo.reshape(H * dv, D)).view(K, B, S, D)
