"""The public Jacobian functions, with torch.func's conventions (docs/design.md section 4).

``step`` is a fastjac model (ItrSA, AKOrN: analytic path) or any callable ``X -> X`` (torch.func path; called as
``step(X)``, or ``step(X, C)`` when C is given). X is [S, D] or [B, S, D]; samples of a batch are independent.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import check_dense_size, check_state
from .linearization import Linearization, linearization


def jvp(step, X: Tensor, T: Tensor, *, C: Optional[Tensor] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Jacobian-vector products of one step: ``(step(X, C), J T)``.

    Args:
        step: a fastjac model or any callable X -> X.
        X: state [S, D] or [B, S, D]. C: injected input, X's shape or [S, D], or None.
        T: one tangent (X's shape) or k tangents [k, *X.shape]; the k tangents share one forward pass and, on the
            analytic backends, one softmax.
        backend: "auto" | "torch" | "autograd" | ... (``fastjac.info`` says what "auto" picks and why).

    Returns:
        (Y, JT): Y has X's shape; JT has T's shape.

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2).double()
        >>> X, T = torch.randn(7, 16, dtype=torch.float64), torch.randn(5, 7, 16, dtype=torch.float64)
        >>> Y, JT = fj.jvp(m, X, T)
        >>> JT.shape
        torch.Size([5, 7, 16])
    """
    lin = linearization(step, X, C=C, backend=backend)
    return lin.out, lin.jvp(T)


def linearize(
    step, X: Tensor, *, C: Optional[Tensor] = None, backend: str = "auto"
) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Linearise one step at X: ``(step(X, C), jvp_fn)``; ``jvp_fn(T)`` reuses the cached forward pass.

    T is X's shape or [k, *X.shape]; jvp_fn returns T's shape. Use this in loops (Lyapunov, power iteration).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2)
        >>> Y, f = fj.linearize(m, torch.randn(3, 7, 16))
        >>> f(torch.randn(4, 3, 7, 16)).shape
        torch.Size([4, 3, 7, 16])
    """
    lin = linearization(step, X, C=C, backend=backend)
    return lin.out, lin.jvp


def vjp(
    step, X: Tensor, *, C: Optional[Tensor] = None, backend: str = "auto"
) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Vector-Jacobian products of one step: ``(step(X, C), vjp_fn)`` with ``vjp_fn(G) = Jᵀ G``.

    G is the output's shape or [k, *shape] for k cotangents; vjp_fn returns a tensor of G's shape (not a tuple as
    torch.func.vjp does: the only primal is X).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2)
        >>> Y, f = fj.vjp(m, torch.randn(7, 16))
        >>> f(torch.ones_like(Y)).shape
        torch.Size([7, 16])
    """
    lin = linearization(step, X, C=C, backend=backend)
    return lin.out, lin.vjp


def jacobian(
    step,
    X: Tensor,
    *,
    C: Optional[Tensor] = None,
    backend: str = "auto",
    max_gb: Optional[float] = None,
    create_graph: bool = False,
) -> Tensor:
    """The dense Jacobian of one step, token-major: entry [i*D + a, m*D + b] is dY[i, a] / dX[m, b].

    Returns [S*D, S*D], or [B, S*D, S*D] for a batched X. Refuses (ValueError, with the size in GB) an output over
    ``max_gb`` (default ``fastjac.config.dense_limit_gb``); use ``jvp``/``linearize`` then. The result carries no
    autograd graph unless ``create_graph=True`` (then it is differentiable in X and the weights on the torch and
    autograd backends, at about twice the memory the limit counts).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(8, 2, norm="layer")
        >>> fj.jacobian(m, torch.randn(5, 8)).shape
        torch.Size([40, 40])
    """
    if isinstance(X, Tensor) and X.dim() in (2, 3):  # refuse an oversized output before any compute
        B = X.shape[0] if X.dim() == 3 else 1
        check_dense_size(X.shape[-2], X.shape[-1], B, X.dtype, max_gb)
    with torch.set_grad_enabled(bool(create_graph) and torch.is_grad_enabled()):
        return linearization(step, X, C=C, backend=backend).dense(max_gb=max_gb)


def info(step, X: Optional[Tensor] = None, backend: str = "auto") -> str:
    """Which backend ``backend`` resolves to for (step, X), and why each other one was or was not usable.

    Example:
        >>> import fastjac as fj, torch
        >>> print(fj.info(fj.ItrSA(8, 2), torch.randn(3, 8)))  # doctest: +ELLIPSIS
        backend='auto' -> torch ...
    """
    if X is None:
        dim = getattr(step, "dim", 1)
        kw = dict(dtype=step.dtype, device=step.device) if hasattr(step, "dtype") and hasattr(step, "device") else {}
        X = torch.zeros(1, 1, dim, **kw)
    X3, _ = check_state(X)
    be = backends.select(step, X3, backend)
    note = be.note(step, X3) if hasattr(be, "note") else None  # e.g. autograd: whether SDPA is routed
    return f"backend={backend!r} -> {be.name} ({backends.explain(step, X3)})" + (f"; {note}" if note else "")


__all__ = ["Linearization", "jvp", "vjp", "linearize", "linearization", "jacobian", "info"]
