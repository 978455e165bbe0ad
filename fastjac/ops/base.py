"""The contract between a backend and everything above it: a linearisation of one step at a batched state.

Backends return a :class:`BatchedLinearization`; the public :class:`fastjac.Linearization` wraps it and handles the
user-facing shapes (unbatched X, one or k tangents). Shapes here are always batched: X, out [B, S, D]; tangents
and cotangents [k, B, S, D]; dense [B, S*D, S*D] token-major.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


class BatchedLinearization:
    """One step linearised at X [B, S, D]. Subclasses set ``X`` and ``out`` and implement the three products.

    ``jvp(T [k, B, S, D]) -> [k, B, S, D]`` (J T), ``vjp(G [k, B, S, D]) -> [k, B, S, D]`` (Jᵀ G) and
    ``dense(out=None) -> [B, S*D, S*D]``, entry [b, i*D + a, m*D + c] = dY[b, i, a] / dX[b, m, c]. The forward pass
    runs once, in the constructor; every product reuses it.
    """

    X: Tensor
    out: Tensor

    def jvp(self, T: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def vjp(self, G: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def dense(self, out: Optional[Tensor] = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
