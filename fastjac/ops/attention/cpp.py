"""k-tangent attention JVP on the compiled C++ kernel (``backend="cpp"``).

Kernel ``attn_jvp_fwd`` (csrc/attn_jvp.cpp) -> custom op ``torch.ops.fastjac.attn_jvp`` -> public
``msa_jvp_cpp``. The probabilities A come from the forward (``ref.msa_cache``, one softmax for every tangent);
the tangent projections T Wq, T Wk, T Wv are one BLAS GEMM by the concatenated weights, and the output projection
one GEMM by Wo, so the kernel sees only the S x S part. Per (batch, head, block of query rows) it forms, for all k
tangents at once,

    odot_ti = sum_j A_ij vdot_tj + beta [ sum_j W_tij v_j - (sum_j W_tij) o_i ] + beta qdot_ti^T M_i,
    W_tij = A_ij (q_i . kdot_tj),   M_i = sum_j A_ij k_j (v_j - o_i)^T,

which is ref.msa_jvp's formula with the qdot half of Ldot folded into the tangent-independent [dh, dv] matrix M_i
(no second S x S pass per tangent); nothing of size k x S x S exists, only an L2-sized block of W per task.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ref import AttnCache, AttnParams


def qkv_weight(p: AttnParams) -> Tensor:
    """Wq, Wk, Wv of every head side by side: [D, H * (2 dh + dv)], columns (h, [q | k | v])."""
    W = torch.cat([p.wq, p.wk, p.wv], -1)  # [H, D, 2dh+dv]
    return W.permute(1, 0, 2).reshape(W.shape[1], -1)


def msa_jvp_cpp(c: AttnCache, T: Tensor, *, wqkv: Optional[Tensor] = None) -> Tensor:
    """d MSA[T] for K tangents T [K, B, S, D] at the state cached in ``c`` (``ref.msa_cache``). Returns [K, B, S, D].

    ``wqkv`` is ``qkv_weight(c.params)`` if the caller keeps it across calls. Not differentiable in the weights.

    Example:
        >>> import torch, fastjac as fj
        >>> from fastjac.ops.attention.ref import msa_cache
        >>> m = fj.ItrSA(12, 3); X = torch.randn(2, 5, 12)
        >>> msa_jvp_cpp(msa_cache(X, m.attn_params()), torch.randn(4, 2, 5, 12)).shape  # doctest: +SKIP
        torch.Size([4, 2, 5, 12])
    """
    from .._utils import compiled_ops as ops
    p = c.params
    if T.dim() != 4 or T.shape[1:] != c.out.shape:
        raise ValueError(f"T: expected [K, {', '.join(map(str, c.out.shape))}], got {tuple(T.shape)}")
    K, B, S, D = T.shape
    H, dh, dv = p.heads, p.wq.shape[-1], p.wv.shape[-1]
    W = qkv_weight(p) if wqkv is None else wqkv
    P = (T.reshape(K * B * S, D) @ W).view(K, B, S, H, 2 * dh + dv).permute(0, 1, 3, 2, 4)  # [K, B, H, S, .]
    qd, kd, vd = P[..., :dh], P[..., dh:2 * dh], P[..., 2 * dh:]
    od = ops().attn_jvp(c.A, c.q, c.k, c.v, c.o, qd, kd, vd, float(p.beta), bool(p.causal))  # [K, B, S, H, dv]
    if p.wo is None:
        return od.sum(-2)
    return (od.view(K * B * S, H * dv) @ p.wo.reshape(H * dv, D)).view(K, B, S, D)
