"""Token-parallel linearisation of ItrSA and AKOrN: each rank holds a contiguous block of tokens.

Rank p holds tokens [s_p, s_{p+1}) of X, C and of every tangent. The normalisation, the residual, AKOrN's
projection and Omega are token-local; attention needs every rank's keys and values (and, in the JVP, their
tangents). They travel around a ring (``isend``/``irecv`` to the neighbours, overlapped with the per-block work,
own block first) and the softmax is merged block by block exactly as the online-softmax (flash) kernels do:

    forward, per key block b:  m' = max(m, max_j s_ij),  l = l e^{m-m'} + sum_j e^{s_ij - m'},
                               acc = acc e^{m-m'} + sum_j e^{s_ij - m'} v_j;     o = acc / l
    JVP (m, l final, so no rescaling is needed):  A_ij = e^{s_ij - m_i} / l_i recomputed per block,
                               acc1 += sum_j A_ij (v'_j + L'_ij v_j),  acc2 += sum_j A_ij L'_ij,
                               o' = acc1 - acc2 o           (L'_ij = beta (q'_i . k_j + q_i . k'_j))

which are the formulas of ``fastjac/ops/attention/ref.py`` with the sum over keys split into the ranks' blocks.
Causal masks use global token indices; key blocks wholly in a query block's future are skipped (but still passed
on). The JVP tiles each received block over its keys (``JVP_CHUNK_ELEMS``) so that its [k, B, H, S_p, c] tensors
stay bounded; the forward's [B, H, S_p, S_q] logits are per block. The forward keeps the P key/value blocks it received (H (dh + dv) numbers per token of the whole sequence),
so the JVP ring carries only the k tangent blocks.

Only ``jvp`` (and the forward) are distributed: ``vjp`` and ``dense`` raise NotImplementedError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops.akorn.ref import omega_apply, proj_jvp
from ..ops.attention.ref import AttnParams, _out_proj, _project
from ..ops.norm.ref import norm_jvp
from ..ops.step.ref import AKOrNLinearization, ItrSALinearization
from . import _comm

# The JVP's per-key-block tensors [k, B, H, S_p, c] (tangent logits, their products with A) are tiled over the keys
# of a received block so that each tile holds at most this many elements (256 MB in float64).
JVP_CHUNK_ELEMS = 2**25


@dataclass
class TokenContext:
    """Where this rank's tokens sit: ``bounds[p] = (s_p, s_{p+1})`` for every rank p of ``group``."""

    group: object
    bounds: List[Tuple[int, int]]
    rank: int

    @property
    def lo(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def hi(self) -> int:
        return self.bounds[self.rank][1]

    @property
    def tokens(self) -> int:
        return self.bounds[-1][1]

    def size(self, p: int) -> int:
        return self.bounds[p][1] - self.bounds[p][0]


class TokenAttention:
    """MSA on this rank's query block against every rank's keys (ring), with the cache its JVP needs.

    q [B, H, S_p, dh]; kv[p] [B, H, S_q, dh + dv] the key/value blocks of every rank; m, l [B, H, S_p, 1] the
    softmax's running max and sum; o [B, H, S_p, dv]; out [B, S_p, D] = MSA(X)'s rows of this rank.
    """

    def __init__(self, X: Tensor, p: AttnParams, ctx: TokenContext):
        self.p, self.ctx = p, ctx
        B, Sp, _ = X.shape
        self.q = _project(X, p.wq, p.bq)
        k, v = _project(X, p.wk, p.bk), _project(X, p.wv, p.bv)
        self.dh, self.dv = k.shape[-1], v.shape[-1]
        H = self.q.shape[1]
        self.kv: List[Optional[Tensor]] = [None] * len(ctx.bounds)
        st = dict(
            m=torch.full((B, H, Sp, 1), float("-inf"), dtype=X.dtype, device=X.device),
            l=torch.zeros(B, H, Sp, 1, dtype=X.dtype, device=X.device),
            acc=torch.zeros(B, H, Sp, self.dv, dtype=X.dtype, device=X.device),
        )

        def block(src: int, kvb: Tensor) -> None:
            self.kv[src] = kvb
            s = self._logits(src)
            if s is None:
                return
            m_new = torch.maximum(st["m"], s.amax(-1, keepdim=True))
            alpha = torch.exp(st["m"] - m_new)
            e = torch.exp(s - m_new)
            st["l"] = st["l"] * alpha + e.sum(-1, keepdim=True)
            st["acc"] = st["acc"] * alpha + e @ kvb[..., self.dh :]
            st["m"] = m_new

        kv = torch.cat([k, v], -1)
        _comm.ring_pass(kv, lambda src: (B, H, ctx.size(src), self.dh + self.dv), block, ctx.group)
        self.m, self.l = st["m"], st["l"]
        self.o = st["acc"] / self.l
        out = _out_proj(self.o, p.wo)
        self.out = out if p.bo is None else out + p.bo

    def _mask(self, src: int, c0: int = 0, c1: Optional[int] = None) -> Optional[Tensor]:
        """Causal: True where key j (keys [c0, c1) of rank src's block) is in the future of query i (this rank's);
        None if there is none."""
        if not self.p.causal:
            return None
        lo, hi = self.ctx.lo, self.ctx.hi
        klo = self.ctx.bounds[src][0]
        c1 = self.ctx.size(src) if c1 is None else c1
        if klo + c1 - 1 <= lo:
            return None
        qi = torch.arange(lo, hi, device=self.q.device)
        kj = torch.arange(klo + c0, klo + c1, device=self.q.device)
        return kj.unsqueeze(0) > qi.unsqueeze(1)

    def _skip(self, src: int, c0: int = 0) -> bool:
        return self.p.causal and self.ctx.bounds[src][0] + c0 > self.ctx.hi - 1  # every key after every query

    def _logits(self, src: int, c0: int = 0, c1: Optional[int] = None) -> Optional[Tensor]:
        """beta q k^T for this rank's queries and keys [c0, c1) of rank src's block (masked); None if all masked."""
        if self._skip(src, c0):
            return None
        kb = self.kv[src][..., c0:c1, : self.dh]
        s = self.p.beta * (self.q @ kb.transpose(-1, -2))  # [B, H, S_p, c1 - c0]
        mask = self._mask(src, c0, c1)
        return s if mask is None else s.masked_fill(mask, float("-inf"))

    def jvp(self, T: Tensor) -> Tensor:
        """d MSA[T] on this rank's rows for this rank's tangent rows T [k, B, S_p, D]. Returns [k, B, S_p, D]."""
        p, dh = self.p, self.dh
        qd, kd, vd = _project(T, p.wq), _project(T, p.wk), _project(T, p.wv)
        st = dict(acc1=None, acc2=None)

        def block(src: int, kvd: Tensor) -> None:
            n = self.ctx.size(src)
            chunk = max(1, min(n, JVP_CHUNK_ELEMS // max(1, qd.numel() // dh)))  # keys per [k, B, H, S_p, c] tile
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                s = self._logits(src, c0, c1)
                if s is None:
                    return
                A = torch.exp(s - self.m) / self.l  # [B, H, S_p, c]
                kb, vb = self.kv[src][..., c0:c1, :dh], self.kv[src][..., c0:c1, dh:]
                Ld = p.beta * (qd @ kb.transpose(-1, -2) + self.q @ kvd[..., c0:c1, :dh].transpose(-1, -2))
                P = A * Ld  # [k, B, H, S_p, c]
                a1 = A @ kvd[..., c0:c1, dh:] + P @ vb
                a2 = P.sum(-1, keepdim=True)
                st["acc1"] = a1 if st["acc1"] is None else st["acc1"] + a1
                st["acc2"] = a2 if st["acc2"] is None else st["acc2"] + a2

        kvd = torch.cat([kd, vd], -1)
        K, B, H = T.shape[0], T.shape[1], self.q.shape[1]
        _comm.ring_pass(kvd, lambda src: (K, B, H, self.ctx.size(src), dh + self.dv), block, self.ctx.group)
        od = st["acc1"] - st["acc2"] * self.o
        return _out_proj(od, p.wo)


class _TokenParallelMixin:
    """What the two steps share: the attention hook runs the ring forward; VJP and dense are not distributed."""

    ctx: TokenContext

    def _attention(self, X: Tensor, p: AttnParams) -> Tensor:
        self.attn = TokenAttention(X, p, self.ctx)
        return self.attn.out

    def vjp(self, G: Tensor) -> Tensor:
        raise NotImplementedError(
            "token-parallel linearisations compute JVPs only (the Benettin iteration); "
            "gather the state and use fj.linearization for VJPs"
        )

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError(
            "token-parallel linearisations have no dense Jacobian; use fj.jacobian on the gathered state"
        )


class TokenParallelItrSALinearization(_TokenParallelMixin, ItrSALinearization):
    """ItrSA step linearised at this rank's token block X [B, S_p, D] (C: the same block of C, or None)."""

    def __init__(self, X: Tensor, C: Optional[Tensor], p, ctx: TokenContext):
        self.ctx = ctx
        super().__init__(X, C, p)

    def jvp(self, T: Tensor) -> Tensor:
        return norm_jvp(self.norm, T + self.p.eta * self.attn.jvp(T))


class TokenParallelAKOrNLinearization(_TokenParallelMixin, AKOrNLinearization):
    """AKOrN step linearised at this rank's token block X [B, S_p, D]."""

    def __init__(self, X: Tensor, C: Optional[Tensor], p, ctx: TokenContext):
        self.ctx = ctx
        super().__init__(X, C, p)

    def jvp(self, T: Tensor) -> Tensor:
        N = self.p.osc_dim
        dP = proj_jvp(self.X, self.Y, T, self.attn.jvp(T), N)
        return norm_jvp(self.norm, T + self.p.eta * (omega_apply(self.p.omega, T) + dP))


def itrsa_token_linearization(step, X: Tensor, C: Optional[Tensor], ctx: TokenContext):
    """ItrSA's token-parallel linearisation at this rank's block X [B, S_p, D]."""
    return TokenParallelItrSALinearization(X, C, step.step_params(), ctx)


def akorn_token_linearization(step, X: Tensor, C: Optional[Tensor], ctx: TokenContext):
    """AKOrN's token-parallel linearisation at this rank's block X [B, S_p, D]."""
    return TokenParallelAKOrNLinearization(X, C, step.step_params(), ctx)


# model class -> factory(step, X_block, C_block, ctx): keyed by the EXACT class, like every kernel backend's table
# (fastjac.backends.base.KernelBackend), so a subclass that changes the maths never gets its parent's Jacobian
TOKEN_LINEARIZERS: Dict[type, Callable] = {}


def register_token_linearizer(model_cls: type, factory: Callable) -> None:
    """Teach ``parallel="tokens"`` a model class: ``factory(step, X [B, S_p, D], C_block | None, ctx)`` returns an
    object with ``.out`` (this rank's rows of step(X)) and ``.jvp(T [k, B, S_p, D])``.

    Only the exact class is looked up. A subclass of ItrSA that keeps ItrSA's maths (it only adds logging, say)
    registers ItrSA's factory for itself; one that overrides ``forward`` needs its own.

    Example:
        >>> import fastjac as fj
        >>> from fastjac.distributed import tokens
        >>> class Logged(fj.ItrSA):
        ...     pass
        >>> tokens.register_token_linearizer(Logged, tokens.itrsa_token_linearization)
        >>> tokens.token_why_not(Logged(8, 2)) is None
        True
    """
    if not isinstance(model_cls, type) or not callable(factory):
        raise TypeError("register_token_linearizer: expected a class and a callable factory")
    TOKEN_LINEARIZERS[model_cls] = factory


def token_why_not(step) -> Optional[str]:
    """None if ``parallel="tokens"`` has a linearisation registered for ``type(step)``, else the reason."""
    if type(step) in TOKEN_LINEARIZERS:
        return None
    known = ", ".join(sorted(c.__name__ for c in TOKEN_LINEARIZERS)) or "none"
    return (
        f"parallel='tokens' has no token-parallel linearisation for {type(step).__name__} (registered, by exact "
        f"class: {known}); a subclass may change the maths, so it never gets its parent's Jacobian. Run it with "
        f"parallel='samples' or in one process (the autograd backend), or register one with "
        f"fastjac.distributed.register_token_linearizer"
    )


def token_linearization(step, X: Tensor, C: Optional[Tensor], ctx: TokenContext):
    """The token-parallel linearisation of a registered model class at this rank's block X [B, S_p, D]."""
    why = token_why_not(step)
    if why is not None:
        raise ValueError(f"step: {why}")
    return TOKEN_LINEARIZERS[type(step)](step, X, C, ctx)


def _register_defaults() -> None:
    from ..models import AKOrN, ItrSA

    register_token_linearizer(ItrSA, itrsa_token_linearization)
    register_token_linearizer(AKOrN, akorn_token_linearization)


_register_defaults()


def jvp_flops(S_p: int, S: int, D: int, H: int, dh: int, dv: int, k: int, B: int = 1, out_proj: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) of one token-parallel step's attention forward + k-tangent JVP on one rank."""
    proj = 2 * S_p * D * H * (2 * dh + dv)  # q, k, v (forward; the same per tangent)
    outp = 2 * S_p * H * dv * D if out_proj else 0
    fwd = proj + 2 * S_p * S * H * (dh + dv) + outp
    recompute = 2 * S_p * S * H * dh  # the JVP's logits, once for all k tangents
    jvp = recompute + k * (proj + 2 * S_p * S * H * (2 * dh + 2 * dv) + outp)  # qd.k, q.kd, A vd, P v
    return B * (fwd + jvp)


def ring_bytes(S: int, S_p: int, H: int, dh: int, dv: int, k: int, elt: int, B: int = 1) -> int:
    """Bytes one rank sends per step in the two ring passes (forward: keys+values; JVP: their k tangents): it
    forwards P - 1 blocks, every block but its successor's, about S - S_p tokens' worth."""
    return B * (1 + k) * (S - S_p) * H * (dh + dv) * elt


__all__ = [
    "TokenContext",
    "TokenAttention",
    "TokenParallelItrSALinearization",
    "TokenParallelAKOrNLinearization",
    "TOKEN_LINEARIZERS",
    "register_token_linearizer",
    "token_why_not",
    "token_linearization",
    "itrsa_token_linearization",
    "akorn_token_linearization",
    "token_parts",
    "jvp_flops",
    "ring_bytes",
]


def token_parts(
    step, X: Tensor, C3: Optional[Tensor], group, *, k: int, backend: str, qr_backend: str, seed: int, store=None
):
    """(Parts, this rank's token block of X, the generators) for the token-parallel run of the full X [B, S, D]."""
    from ..analysis.benettin import Parts, radial_basis
    from .qr import distributed_qr

    why = token_why_not(step)
    if why is not None:
        raise ValueError(f"step: {why}")
    if backend not in ("auto", "torch"):
        raise ValueError(
            f"backend: parallel='tokens' runs its ring attention in torch ops; expected 'auto' or "
            f"'torch', got {backend!r}"
        )
    r, P = _comm.rank_and_size(group)
    B, S, D = X.shape
    if S < P:
        raise ValueError(f"X0: parallel='tokens' needs at least one token per rank: S={S} tokens, {P} ranks")
    ctx = TokenContext(group, _comm.all_bounds(S, P), r)
    lo, hi = ctx.lo, ctx.hi
    Xl = X[:, lo:hi].contiguous()
    Cl = None if C3 is None else C3[..., lo:hi, :].contiguous()
    rows = [ctx.size(p) * D for p in range(P)]
    gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]

    def orthonormalize(V):
        kk, Bb, Sp, _ = V.shape
        Q, logd, _ = distributed_qr(V.reshape(kk, Bb, Sp * D).permute(1, 2, 0), rows, group, qr_backend)
        return Q.permute(2, 0, 1).reshape(kk, Bb, Sp, D), logd

    def colnorms(V):  # [k, B] float64 over every rank's rows
        sq = V.reshape(V.shape[0], V.shape[1], -1).double().square().sum(-1)
        return _comm.all_reduce(sq, "sum", group).sqrt()

    def draw(gs):  # the single-process draws, sliced to this rank's tokens
        return torch.stack([torch.randn(k, S, D, generator=g, dtype=torch.float64)[:, lo:hi] for g in gs], 1)

    parts = Parts(
        linearize=lambda Xs: token_linearization(step, Xs, Cl, ctx),
        advance=lambda Xs: token_linearization(step, Xs, Cl, ctx).out,
        orthonormalize=orthonormalize,
        draw=draw,
        radial=lambda Xs: radial_basis(step, Xs),
        n=S * D,
        colnorms=colnorms,
        reduce=lambda t, op: _comm.all_reduce(t, op, group),
        store=store,
        check_each_step=False,
        save_on_interrupt=False,
    )
    return parts, Xl, gens
