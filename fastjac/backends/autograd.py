"""``backend="autograd"``: torch.func on the plain forward of any callable; the reference every fast path is
tested against.

Every call of the step runs inside :func:`fastjac.nn.attention.forward_ad` (unless
``fastjac.config.sdpa_forward_ad`` is False): PyTorch's SDPA, which has no forward-mode derivative, becomes
fastjac's (k tangents share one softmax), and the fused MHA / encoder fast paths are off. So ``fj.jvp``,
``fj.lyapunov_spectrum``, the regularisers, ... work on nn.TransformerEncoderLayer, nn.MultiheadAttention and HF
layers. Attention written out with ``softmax`` is unaffected (it already works with torch.func)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops.base import BatchedLinearization
from ..ops.step.ref import DENSE_CHUNK_BYTES
from .base import Backend


class AutogradLinearization(BatchedLinearization):
    """torch.func on a callable. ``f`` maps the batched state [B, S, D] to [B, S, D]."""

    def __init__(self, f: Callable[[Tensor], Tensor], X: Tensor):
        self.f, self.X = f, X
        # the reverse-mode closure is built on the first vjp only: JVP-only users (Lyapunov) pay one forward
        self.out, self._vjp_cache = f(X), None
        if not isinstance(self.out, Tensor):
            raise TypeError(f"step: expected it to return a Tensor, got {type(self.out).__name__}")
        if self.out.shape != X.shape:
            raise ValueError(f"step: a step must map X to X's shape, got {tuple(self.out.shape)} from {tuple(X.shape)}")
        if self.out.dtype != X.dtype:
            raise TypeError(
                f"step: returned {self.out.dtype} for a {X.dtype} X; a step must keep X's dtype "
                f"(its Jacobian would silently lose precision)"
            )

    def jvp(self, T: Tensor) -> Tensor:
        one = lambda t: torch.func.jvp(self.f, (self.X,), (t,))[1]  # noqa: E731
        return one(T[0]).unsqueeze(0) if T.shape[0] == 1 else torch.func.vmap(one)(T)

    def vjp(self, G: Tensor) -> Tensor:
        if self._vjp_cache is None:
            self._vjp_cache = torch.func.vjp(self.f, self.X)[1]
        one = lambda g: self._vjp_cache(g)[0]  # noqa: E731
        return one(G[0]).unsqueeze(0) if G.shape[0] == 1 else torch.func.vmap(one)(G)

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        """Rows by reverse mode: cotangent e_r in every sample at once (samples are independent), chunked."""
        B, S, D = self.X.shape
        n = S * D
        if out is None:
            out = torch.empty(B, n, n, dtype=self.X.dtype, device=self.X.device)
        # a vmapped attention VJP holds about 4 S^2 H floats per cotangent; budget rows by that bound
        per_row = max(1, B * (4 * S * S * 8 + 8 * n) * self.X.element_size())
        chunk = max(1, min(n, DENSE_CHUNK_BYTES // per_row))
        eye = torch.eye(n, dtype=self.X.dtype, device=self.X.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            G = eye[r0:r1].reshape(r1 - r0, 1, S, D).expand(r1 - r0, B, S, D)
            out[:, r0:r1] = self.vjp(G).reshape(r1 - r0, B, n).transpose(0, 1)
        return out


def _routed(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """f, run inside fastjac.nn.attention.forward_ad() when the setting asks for it (read at each call)."""
    from .. import config

    def g(X3: Tensor) -> Tensor:
        if not config.sdpa_forward_ad:
            return f(X3)
        from ..nn.attention import forward_ad

        with forward_ad():
            return f(X3)

    return g


def autograd_linearization(
    step, X: Tensor, C: Optional[Tensor], batched: bool, with_c: bool = True
) -> AutogradLinearization:
    """torch.func linearisation of ``step`` (called as step(x) or step(x, c), unbatched when X was) at X [B, S, D]."""

    @_routed
    def f(X3: Tensor) -> Tensor:
        x = X3 if batched else X3[0]
        if C is None or not with_c:
            y = step(x)
        else:
            y = step(x, C if batched or C.dim() == 2 else C[0])
        if not isinstance(y, Tensor):
            raise TypeError(f"step: expected it to return a Tensor, got {type(y).__name__}")
        return y if batched else y.unsqueeze(0)

    return AutogradLinearization(f, X)


class AutogradBackend(Backend):
    name = "autograd"

    def why_not(self, step, X):
        return None if callable(step) else f"step is a {type(step).__name__}, which is not callable"

    def linearize(self, step, X, C, batched):
        return autograd_linearization(step, X, C, batched)

    def note(self, step, X: Tensor) -> str:
        """For ``fj.info``: whether SDPA is routed to fastjac's forward-mode SDPA, and whether this step calls it
        (one probing forward of ``step`` on X [B, S, D], without gradient; a step that needs C is not probed)."""
        from .. import config

        if not config.sdpa_forward_ad:
            return (
                "autograd: F.scaled_dot_product_attention is NOT routed (fastjac.config.sdpa_forward_ad is "
                "False): a step calling PyTorch's fused SDPA fails under forward AD"
            )
        from ..nn import attention as A
        from ..nn.functional import kernel_for

        before = A.routed_calls()
        try:
            with torch.no_grad(), A.forward_ad():
                step(X[0])
            n = A.routed_calls() - before
            probe = (
                f"this step calls SDPA {n} time(s) per step"
                if n
                else "this step makes no SDPA call (attention written with softmax needs no routing)"
            )
        except Exception as e:  # a step needing C, or a broken one: say so, do not fail info
            probe = f"the step could not be probed on X alone ({type(e).__name__})"
        return (
            f"autograd: F.scaled_dot_product_attention is routed to fastjac.nn.functional (forward_ad(): "
            f"k tangents share one softmax; JVP kernel {kernel_for(X)}; MHA fast path off; opt out with "
            f"fastjac.config.settings(sdpa_forward_ad=False)); {probe}"
        )
