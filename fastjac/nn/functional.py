"""A ``scaled_dot_product_attention`` that composes with every ``torch.func`` transform.

PyTorch's fused SDPA kernels (flash / efficient / the CPU flash kernel) have no forward-mode derivative, so
``torch.func.jvp`` / ``jacfwd`` / fastjac's Lyapunov loop fail on any model that calls them, and the math backend
that does work materialises k x H x L x S probabilities under ``vmap(jvp)``. This module is one
``torch.autograd.Function`` (``_Attn``) with

- ``forward``: the attention output and the per-row log-sum-exp (lse, saved; no [L, S] tensor is kept);
- ``jvp``: the analytic tangent ``od_i = sum_j p_ij (vd_j + Ld_ij (v_j - o_i))``, ``Ld = scale (qd k^T + q kd^T) + bd``,
  through a second Function (``_AttnJvp``) whose ``vmap`` rule turns ``vmap(jvp)`` over k tangents into ONE call
  with k tangents that shares one recomputed softmax (the C++ flash kernel where it is built, else a torch
  reference chunked over query rows), and whose ``backward`` makes the tangent differentiable (reverse over
  forward: the gradient of a JVP in the weights, what the Jacobian regularisers need);
- ``backward``: flash-style (recomputes p per chunk of query rows from q, k; never uses the saved lse, so that the
  backward is itself differentiable: double backward and forward over reverse are exact);
- ``vmap``: batching over the primal (vmap over samples) by folding the vmapped dimension into the batch.

Memory: every path works on blocks of query rows, so nothing of size L x S (or k x L x S) exists beyond one block
(``CHUNK_BYTES``) and the caller's own mask.

Supported transforms (each tested against float64 attention written out with ``softmax``): forward, ``jvp``,
``vmap(jvp)``, ``jacfwd``, ``jacrev``, ``vjp``, ``grad``, ``hessian`` (jacfwd(jacrev)), double backward, reverse
over forward (``grad`` of a ``jvp``, one or k tangents). Forward over forward (``jvp`` of ``jvp``) raises a clear
error instead of returning a silent zero.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

# budget of one block of probabilities (k tangents x batch x heads x rows x S) in the torch reference, bytes
CHUNK_BYTES = 64 * 2**20

_ORIG_SDPA = torch.nn.functional.scaled_dot_product_attention


# ----------------------------------------------------------------------------------------------------------------
# torch reference: blocks of query rows, online over nothing (the whole key range of a block fits the budget)
# ----------------------------------------------------------------------------------------------------------------


def _rows_per_block(rows: int, S: int, per_row_elems: int, elsize: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // max(1, per_row_elems * S * elsize)))


def _logits(q: Tensor, k: Tensor, bias: Optional[Tensor], scale: float, causal: bool, r0: int, r1: int) -> Tensor:
    """scale q[r0:r1] k^T + bias[r0:r1], -inf where causal hides a key. [..., r1-r0, S]."""
    s = scale * (q[..., r0:r1, :] @ k.transpose(-1, -2))
    if bias is not None:
        s = s + bias[..., r0:r1, :]
    if causal:
        S = k.shape[-2]
        i = torch.arange(r0, r1, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(S, device=q.device)[None, :] > i, float("-inf"))
    return s


def _probs(s: Tensor, lse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """p = softmax(s) over the last dim and the row lse; a fully masked row (all -inf) gives p = 0, lse = -inf."""
    if lse is None:
        lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - safe.unsqueeze(-1)), lse


def _fwd_ref(q, k, v, bias, scale, causal) -> Tuple[Tensor, Tensor]:
    L, S = q.shape[-2], k.shape[-2]
    lead = max(1, q[..., 0, 0].numel())
    step = _rows_per_block(L, S, lead, q.element_size())
    os, lses = [], []
    for r0 in range(0, L, step):
        p, lse = _probs(_logits(q, k, bias, scale, causal, r0, min(L, r0 + step)))
        os.append(p @ v)
        lses.append(lse)
    return torch.cat(os, -2), torch.cat(lses, -1)


def _jvp_ref(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal) -> Tensor:
    """K tangents at once: q [B, H, L, E] ..., qd/kd/vd [K, B, H, ., .] or None, bd [K, b, h, L, S] or None.
    Returns od [K, B, H, L, Ev]. p is recomputed once per block of rows and shared by the K tangents.

    The formula, per row i (docs: fastjac/ops/attention/README.md), with W_tij = scale q_i.kd_tj + bd_tij:
        od_ti = sum_j p_ij vd_tj + [sum_j p_ij W_tij v_j - (sum_j p_ij W_tij) o_i] + scale qd_ti^T M_i,
        M_i = sum_j p_ij k_j (v_j - o_i)^T   ([E, Ev], the same for every tangent),
    so each block costs GEMMs with the K tangents side by side (one [r, S] x [S, K Ev] product for vd, one
    [r, E] x [E, K S] for kd, one [r K, S] x [S, Ev + 1] for the W terms) and no [K, r, S] tensor for qd.
    """
    B, H, L, E = q.shape
    S, Ev = k.shape[-2], v.shape[-1]
    K = next(t.shape[0] for t in (qd, kd, vd, bd) if t is not None)
    lead = B * H
    inplace = not torch.is_grad_enabled()
    step = _rows_per_block(L, S, ((1 if inplace else 2) * K + 2) * lead, q.element_size())
    # tangents side by side along the GEMM's N dimension (done once, not per block)
    vdp = None if vd is None else vd.permute(1, 2, 3, 0, 4).reshape(B, H, S, K * Ev)
    kdp = None if kd is None else kd.permute(1, 2, 4, 0, 3).reshape(B, H, E, K * S)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1) if (kd is not None or bd is not None) else None
    kv = None if qd is None else (k.unsqueeze(-1) * v.unsqueeze(-2)).reshape(B, H, S, E * Ev)
    qs = q * scale  # the scale on the small factor, not on the [r, K, S] product
    # (inplace: the Function's forward runs without grad, so the big [r, K, S] block is updated in place there;
    # the backward's differentiable recomputation, in grad mode, must not)
    ods = []
    for r0 in range(0, L, step):
        r1 = min(L, r0 + step)
        r = r1 - r0
        p, _ = _probs(_logits(q, k, bias, scale, causal, r0, r1), None if lse is None else lse[..., r0:r1])
        o_r = o[..., r0:r1, :]
        od = None
        if vdp is not None:
            od = (p @ vdp).view(B, H, r, K, Ev)
        W = None
        if kdp is not None:
            W = (qs[..., r0:r1, :] @ kdp).view(B, H, r, K, S)
        if bd is not None:
            t = bd[..., r0:r1, :].permute(1, 2, 3, 0, 4)  # [b, h, r, K, S]
            W = t if W is None else (W.add_(t) if inplace else W + t)
        if W is not None:
            PW = W.mul_(p.unsqueeze(-2)) if inplace and kdp is not None else p.unsqueeze(-2) * W
            PW = PW.reshape(B, H, r * K, S)
            a = (PW @ v1).view(B, H, r, K, Ev + 1)
            t = a[..., :Ev] - a[..., Ev:] * o_r.unsqueeze(-2)
            od = t if od is None else od + t
        if kv is not None:
            M = (p @ kv).view(B, H, r, E, Ev) - (p @ k).unsqueeze(-1) * o_r.unsqueeze(-2)
            t = scale * (qd[..., r0:r1, :].permute(1, 2, 3, 0, 4) @ M)  # [B, H, r, K, E] x [B, H, r, E, Ev]
            od = t if od is None else od + t
        if od is None:
            od = torch.zeros(B, H, r, K, Ev, dtype=o.dtype, device=o.device)
        ods.append(od)
    return torch.cat(ods, 2).permute(3, 0, 1, 2, 4)


def _bwd_ref(q, k, v, bias, go, scale, causal, need_bias: bool):
    """Gradients of sum(go * o) w.r.t. q, k, v (and bias, reduced to its broadcast shape). Recomputes p from q, k
    (never the saved lse), so that this function is itself differentiable in everything."""
    L, S = q.shape[-2], k.shape[-2]
    lead = max(1, q[..., 0, 0].numel())
    step = _rows_per_block(L, S, 3 * lead, q.element_size())
    gq, gk, gv, gb = [], None, None, []
    for r0 in range(0, L, step):
        r1 = min(L, r0 + step)
        p, _ = _probs(_logits(q, k, bias, scale, causal, r0, r1))
        g = go[..., r0:r1, :]
        dv = p.transpose(-1, -2) @ g
        dp = g @ v.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        gq.append(scale * (ds @ k))
        dk = scale * (ds.transpose(-1, -2) @ q[..., r0:r1, :])
        gk = dk if gk is None else gk + dk
        gv = dv if gv is None else gv + dv
        if need_bias:
            gb.append(ds)
    gb = torch.cat(gb, -2) if need_bias else None
    return torch.cat(gq, -2), gk, gv, gb


# ----------------------------------------------------------------------------------------------------------------
# kernel choice
# ----------------------------------------------------------------------------------------------------------------


def _cpp_module():
    """fastjac.ops.attention.cpp if it has the flash ops (issue 18's contract) and they are usable, else None."""
    try:
        from ..ops.attention import cpp as m
    except Exception:  # pragma: no cover - depends on the installation
        return None
    if getattr(m, "flash_jvp", None) is None or getattr(m, "flash_forward", None) is None:
        return None
    avail = getattr(m, "flash_available", None)
    try:
        return m if avail is None or avail() is None else None
    except Exception:  # pragma: no cover
        return None


def kernel_for(q: Tensor) -> str:
    """Which kernel computes the k-tangent attention JVP for tensors like ``q``: "cpp-flash" (the C++ flash-tiled
    kernel, CPU float32/float64, when built), else "torch-chunked" (the torch reference, blocks of query rows).

    CUDA tensors also take the torch reference: the Triton attention kernel of fastjac (ops/attention/triton.py)
    takes a fastjac model's weights, not q, k, v, so it is not wired here.
    """
    # Under torch.compile the traced C++ flash ops gave wrong tangents (0.86 off in float64, torch 2.13, backend
    # "eager"; their fake kernels' layout is not what the real ops return): compiled code takes the torch reference.
    if (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and _cpp_module() is not None
        and not torch.compiler.is_compiling()
    ):
        return "cpp-flash"
    return "torch-chunked"


def _low(x: Optional[Tensor]) -> bool:
    return x is not None and x.dtype in (torch.float16, torch.bfloat16)


def _fwd(q, k, v, bias, scale, causal):
    if kernel_for(q) == "cpp-flash":
        return _cpp_module().flash_forward(q, k, v, scale=scale, causal=causal, bias=bias)
    if _low(q):  # half precision: accumulate in float32 (as PyTorch's CPU kernels do)
        o, lse = _fwd_ref(q.float(), k.float(), v.float(), None if bias is None else bias.float(), scale, causal)
        return o.to(q.dtype), lse.to(q.dtype)
    return _fwd_ref(q, k, v, bias, scale, causal)


def _jvp_k(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal):
    """od [K, B, H, L, Ev] for K tangents (a None tangent is zero)."""
    if bd is None and kernel_for(q) == "cpp-flash":
        K = next(t.shape[0] for t in (qd, kd, vd) if t is not None)
        z = lambda x: torch.zeros((), dtype=x.dtype, device=x.device).expand(K, *x.shape)  # noqa: E731
        return _cpp_module().flash_jvp(
            q,
            k,
            v,
            o,
            lse,
            z(q) if qd is None else qd,
            z(k) if kd is None else kd,
            z(v) if vd is None else vd,
            scale=scale,
            causal=causal,
            bias=bias,
        )
    if _low(q):
        f = lambda x: None if x is None else x.float()  # noqa: E731
        return _jvp_ref(f(q), f(k), f(v), f(bias), f(o), f(lse), f(qd), f(kd), f(vd), f(bd), scale, causal).to(q.dtype)
    return _jvp_ref(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal)


# ----------------------------------------------------------------------------------------------------------------
# the autograd Functions
# ----------------------------------------------------------------------------------------------------------------


def _merge(x: Optional[Tensor], bdim, n: int, at: int, size: int) -> Optional[Tensor]:
    """x with vmap's dim ``bdim`` moved to ``at`` and merged with dim ``at+1`` (expanded to ``size`` there first;
    an unbatched x is expanded to n)."""
    if x is None:
        return None
    x = x.unsqueeze(at).expand(*x.shape[:at], n, *x.shape[at:]) if bdim is None else x.movedim(bdim, at)
    if x.shape[at + 1] != size:
        x = x.expand(*x.shape[: at + 1], size, *x.shape[at + 2 :])
    return x.reshape(*x.shape[:at], -1, *x.shape[at + 2 :])


def _merge_bcast(x: Optional[Tensor], bdim, n: int, at: int, size: int) -> Optional[Tensor]:
    """As _merge for a mask/bias whose dim ``at`` may be a broadcast 1: an unbatched one stays as it is."""
    if x is None or (bdim is None and x.shape[at] == 1):
        return x
    return _merge(x, bdim, n, at, size)


def _size(x: Tensor, bdim, d: int) -> int:
    """Dim d of x as the Function sees it (vmap's dim removed)."""
    return x.shape[d] if bdim is None else x.movedim(bdim, 0).shape[d + 1]


class _AttnJvp(torch.autograd.Function):
    """od [K, B, H, L, Ev] = the JVP of attention for K tangents. Its vmap rule folds vmapped tangents into K (and
    vmapped primals into B), so vmap(jvp) is one K-tangent call; its backward recomputes the tangent with
    differentiable torch ops (reverse over forward)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal):
        return _jvp_k(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal = inputs
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.causal = scale, causal
        ctx.has = [t is not None for t in (q, k, v, bias, qd, kd, vd, bd)]
        ctx.save_for_backward(*[t for t in (q, k, v, bias, qd, kd, vd, bd) if t is not None])

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "fastjac.nn.functional.scaled_dot_product_attention: forward mode over forward mode (a jvp of a jvp, "
            "jacfwd(jacfwd), a forward-mode Hessian) is not supported; use jacfwd(jacrev) or jacrev(jacfwd)"
        )

    @staticmethod
    def backward(ctx, god):
        if god is None:
            return (None,) * 12
        it = iter(ctx.saved_tensors)
        q, k, v, bias, qd, kd, vd, bd = [next(it) if h else None for h in ctx.has]
        need = ctx.needs_input_grad
        ins = {0: q, 1: k, 2: v, 3: bias, 6: qd, 7: kd, 8: vd, 9: bd}
        with torch.enable_grad():
            leaves = {i: t.detach().requires_grad_(True) for i, t in ins.items() if t is not None and need[i]}
            a = {i: leaves.get(i, t) for i, t in ins.items()}
            # the differentiable formula: recompute p (no lse hint), so the graph covers its dependence on q, k
            od = _jvp_ref(
                a[0],
                a[1],
                a[2],
                a[3],
                _AttnOut.apply(a[0], a[1], a[2], a[3], ctx.scale, ctx.causal)[0],
                None,
                a[6],
                a[7],
                a[8],
                a[9],
                ctx.scale,
                ctx.causal,
            )
            idx = list(leaves)
            grads = (
                torch.autograd.grad(
                    od, [leaves[i] for i in idx], god, allow_unused=True, create_graph=torch.is_grad_enabled()
                )
                if idx
                else ()
            )
        out = [None] * 12
        for i, g in zip(idx, grads):
            out[i] = g if g is not None else torch.zeros_like(ins[i])
        if out[3] is not None:
            out[3] = _sum_to(out[3], bias.shape)
        if out[9] is not None:
            out[9] = _sum_to(out[9], bd.shape)
        return tuple(out)

    @staticmethod
    def vmap(info, in_dims, q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal):
        n = info.batch_size
        if any(d is not None for d in in_dims[:6]):
            # vmap over the primal (samples), tangents with it or not: fold vmap's dim into B
            B = _size(q, in_dims[0], 0)
            fq, fk, fv, fo, fl = (_merge(t, d, n, 0, B) for t, d in zip((q, k, v, o, lse), in_dims[:3] + in_dims[4:6]))
            fb = _merge_bcast(bias, in_dims[3], n, 0, B)
            ft = [_merge(t, d, n, 1, B) for t, d in zip((qd, kd, vd), in_dims[6:9])]
            fbd = _merge_bcast(bd, in_dims[9], n, 1, B)
            od = _AttnJvp.apply(fq, fk, fv, fb, fo, fl, *ft, fbd, scale, causal)
            return od.reshape(od.shape[0], n, B, *od.shape[2:]), 1
        # vmap over tangents only (jacfwd, fastjac's k tangents): fold vmap's dim into K, ONE kernel call
        K = next(_size(t, d, 0) for t, d in zip((qd, kd, vd, bd), in_dims[6:10]) if t is not None)
        ft = [_merge(t, d, n, 0, K) for t, d in zip((qd, kd, vd, bd), in_dims[6:10])]
        od = _AttnJvp.apply(q, k, v, bias, o, lse, *ft, scale, causal)
        return od.reshape(n, K, *od.shape[1:]), 0


class _AttnOut(torch.autograd.Function):
    """o = attention(q, k, v) [B, H, L, Ev] with q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev], bias broadcastable
    to [B, H, L, S] or None. Returns (o, lse); lse is non-differentiable (a cache for the jvp)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(q, k, v, bias, scale, causal):
        return _fwd(q, k, v, bias, scale, causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, scale, causal = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an input without tangent (a mask) arrives as None, not as zeros
        ctx.scale, ctx.causal, ctx.has_bias = scale, causal, bias is not None
        ts = (q, k, v, o, lse) + ((bias,) if bias is not None else ())
        ctx.save_for_backward(*ts)
        ctx.save_for_forward(*ts)

    @staticmethod
    def backward(ctx, go, glse):
        if go is None:
            return None, None, None, None, None, None
        q, k, v, o, lse, *b = ctx.saved_tensors
        bias = b[0] if b else None
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        gq, gk, gv, gb = _bwd_ref(q, k, v, bias, go, ctx.scale, ctx.causal, need_b)
        if need_b:
            gb = _sum_to(gb, bias.shape)
        return gq, gk, gv, gb, None, None

    @staticmethod
    def jvp(ctx, qd, kd, vd, bd, *_):
        q, k, v, o, lse, *b = ctx.saved_tensors
        bias = b[0] if b else None
        if all(t is None for t in (qd, kd, vd, bd)):
            return torch.zeros_like(o), None
        u = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
        od = _AttnJvp.apply(q, k, v, bias, o, lse, u(qd), u(kd), u(vd), u(bd), ctx.scale, ctx.causal)
        return od[0], None

    @staticmethod
    def vmap(info, in_dims, q, k, v, bias, scale, causal):
        n = info.batch_size
        B = _size(q, in_dims[0], 0)
        fq, fk, fv = (_merge(t, d, n, 0, B) for t, d in zip((q, k, v), in_dims[:3]))
        o, lse = _AttnOut.apply(fq, fk, fv, _merge_bcast(bias, in_dims[3], n, 0, B), scale, causal)
        return (o.reshape(n, B, *o.shape[1:]), lse.reshape(n, B, *lse.shape[1:])), (0, 0)


def _sum_to(g: Tensor, shape) -> Tensor:
    """Reduce a broadcast gradient to ``shape`` (the bias was broadcast against [B, H, L, S])."""
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


# ----------------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------------


def _forward_mode_active(tensors) -> bool:
    """True when a forward-mode transform (torch.func.jvp / jacfwd, or torch.autograd.forward_ad) sees these."""
    try:
        from torch._C._functorch import TransformType, peek_interpreter_stack  # noqa: F401
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
            return True
    except Exception:  # pragma: no cover - private API moved
        pass
    import torch.autograd.forward_ad as fwAD

    return any(isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with forward-mode derivatives: the same signature and
    semantics, and it composes with ``torch.func.jvp`` / ``vmap(jvp)`` (k tangents share one softmax, one kernel
    call) / ``jacfwd`` / ``jacrev`` / ``grad`` and the gradient of a JVP.

    Args:
        query: [..., Hq, L, E]. key: [..., H, S, E]. value: [..., H, S, Ev] (leading dims broadcast).
        attn_mask: boolean (True = attend) or additive float, broadcastable to [..., Hq, L, S], or None.
        dropout_p: dropout on the probabilities. Under a forward-mode transform only 0 is allowed (the Jacobian
            of a random map is not defined); otherwise the call is PyTorch's own SDPA, dropout and all.
        is_causal: key j is attended by query i iff j <= i (top-left aligned, also for L != S); not with a mask.
        scale: defaults to 1/sqrt(E).
        enable_gqa: Hq a multiple of H; key/value heads are shared by groups of Hq/H query heads.

    Returns:
        [..., Hq, L, Ev]. A fully masked query row gives 0 (PyTorch's math backend gives NaN), and 0 tangents.

    Example:
        >>> import torch
        >>> from fastjac.nn.functional import scaled_dot_product_attention as sdpa
        >>> q, k, v = torch.randn(3, 2, 4, 5, 8, dtype=torch.float64).unbind(0)
        >>> o, od = torch.func.jvp(lambda q: sdpa(q, k, v, is_causal=True), (q,), (torch.randn_like(q),))
        >>> od.shape
        torch.Size([2, 4, 5, 8])
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected at least 2 dims [..., L, E], got shape {tuple(t.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"key: expected the last dim of query ({query.shape[-1]}), got shape {tuple(key.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"value: expected {key.shape[-2]} rows like key, got shape {tuple(value.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key, value: expected one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not query.is_floating_point():
        raise TypeError(f"query: expected a floating-point tensor, got {query.dtype}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a number in [0, 1], got {dropout_p!r}")
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal: expected False when attn_mask is given (PyTorch's rule: pass one or the other)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale: expected a finite float or None, got {scale!r}")
    if dropout_p > 0.0:
        if _forward_mode_active((query, key, value, attn_mask)):
            raise ValueError(
                f"dropout_p: {dropout_p} under a forward-mode transform (torch.func.jvp / jacfwd / fastjac's "
                "Jacobians): the Jacobian of a random map is not defined; put the model in eval() mode or set its "
                "attention dropout to 0"
            )
        # plain training with dropout: PyTorch's own kernel, bit for bit (its RNG, its keep-mask)
        kw = {"enable_gqa": True} if enable_gqa else {}
        return _ORIG_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw
        )
    E = query.shape[-1]
    sc = float(1.0 / math.sqrt(E)) if scale is None else float(scale)
    Hq, Hk = (query.shape[-3] if query.dim() >= 3 else 1), (key.shape[-3] if key.dim() >= 3 else 1)
    if enable_gqa and Hq != Hk:
        if query.dim() < 3 or Hq % Hk != 0 or value.shape[-3] != Hk:
            raise ValueError(f"enable_gqa: expected query heads ({Hq}) a multiple of key/value heads ({Hk})")
        # each key/value head serves Hq/Hk consecutive query heads (PyTorch's repeat_interleave convention)
        key = key.repeat_interleave(Hq // Hk, dim=-3)
        value = value.repeat_interleave(Hq // Hk, dim=-3)
    L, S = query.shape[-2], key.shape[-2]
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    # the Functions see [B, H, ., .]: H = the last leading dim, B = the product of the others
    B4, H4 = (math.prod(lead[:-1]), lead[-1]) if lead else (1, 1)
    q = query.expand(*lead, L, E).reshape(B4, H4, L, E)
    k = key.expand(*lead, S, E).reshape(B4, H4, S, E)
    v = value.expand(*lead, S, value.shape[-1]).reshape(B4, H4, S, value.shape[-1])
    bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a Tensor or None, got {type(attn_mask).__name__}")
        try:
            full = torch.broadcast_shapes(attn_mask.shape, (*lead, L, S))
        except RuntimeError:
            full = None
        if full != (*lead, L, S):
            raise ValueError(
                f"attn_mask: expected a shape broadcastable to {(*lead, L, S)}, got {tuple(attn_mask.shape)}"
            )
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        elif attn_mask.dtype == query.dtype:
            bias = attn_mask
        else:
            raise TypeError(f"attn_mask: expected bool or {query.dtype} (query's dtype), got {attn_mask.dtype}")
        # to [b, h, L, S] with b in {1, B}, h in {1, H}: a view whenever the mask does not vary over a folded dim
        bias = bias.reshape((1,) * (len(lead) + 2 - bias.dim()) + tuple(bias.shape))
        if lead:
            outer = bias.shape[: len(lead) - 1]
            b = 1 if all(s == 1 for s in outer) else B4
            bias = bias.expand(*(lead[:-1] if b != 1 else outer), *bias.shape[len(lead) - 1 :])
            bias = bias.reshape(b, bias.shape[-3], *bias.shape[-2:]).expand(b, bias.shape[-3], L, S)
        else:
            bias = bias.reshape(1, 1, *bias.shape[-2:]).expand(1, 1, L, S)
    o, _ = _AttnOut.apply(q, k, v, bias, sc, bool(is_causal))
    return o.reshape(*lead, L, o.shape[-1])


__all__ = ["scaled_dot_product_attention", "kernel_for", "CHUNK_BYTES"]
