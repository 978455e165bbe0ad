"""The public Jacobian functions, with torch.func's conventions (DESIGN section 4).

``step`` is a fastjac model (ItrSA, AKOrN: analytic path) or any callable ``X -> X`` (torch.func path; called as
``step(X)``, or ``step(X, C)`` when C is given). X is [S, D] or [B, S, D]; samples of a batch are independent.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import check_dense_size, check_input, check_state, check_tangent, check_tensor


def _model_check(step, X: Tensor) -> None:
    if not isinstance(step, backends.FASTJAC_MODELS):
        return
    w = step.wq
    if X.shape[-1] != step.dim:
        raise ValueError(f"X: last dimension {X.shape[-1]} does not match the model's dim={step.dim}")
    if X.dtype != w.dtype:
        raise TypeError(f"X: dtype {X.dtype} does not match the model's {w.dtype}; use model.to({X.dtype}) or "
                        f"X.to({w.dtype})")
    if X.device != w.device:
        raise ValueError(f"X: device {X.device} does not match the model's {w.device}")


def _linearize(step, X, C, backend):
    if not callable(step):
        raise TypeError(f"step: expected a fastjac model or a callable X -> X, got {type(step).__name__}")
    X3, batched = check_state(X)
    _model_check(step, X)
    C = check_input(C, X)
    C3 = None if C is None else (C if batched else C.unsqueeze(0))
    be = backends.select(step, X3, backend)
    return be.linearize(step, X3, C3, batched), batched


def _unbatch(y: Tensor, batched: bool, lead: int = 0) -> Tensor:
    # drop the B = 1 dim that an unbatched X was given (it sits after `lead` leading dims)
    return y if batched else y.squeeze(lead)


def _as_k(name: str, T: Tensor, X: Tensor, batched: bool) -> Tuple[Tensor, bool]:
    Tk, has_k = check_tangent(name, T, X)
    return (Tk if batched else Tk.unsqueeze(1)), has_k


def _with_k(y: Tensor, batched: bool, has_k: bool) -> Tensor:
    y = _unbatch(y, batched, lead=1)
    return y if has_k else y[0]


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
    lin, batched = _linearize(step, X, C, backend)
    Tk, has_k = _as_k("T", T, X, batched)
    return _unbatch(lin.out, batched), _with_k(lin.jvp(Tk), batched, has_k)


def linearize(step, X: Tensor, *, C: Optional[Tensor] = None,
              backend: str = "auto") -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Linearise one step at X: ``(step(X, C), jvp_fn)``; ``jvp_fn(T)`` reuses the cached forward pass.

    T is X's shape or [k, *X.shape]; jvp_fn returns T's shape. Use this in loops (Lyapunov, power iteration).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2)
        >>> Y, f = fj.linearize(m, torch.randn(3, 7, 16))
        >>> f(torch.randn(4, 3, 7, 16)).shape
        torch.Size([4, 3, 7, 16])
    """
    lin, batched = _linearize(step, X, C, backend)

    def jvp_fn(T: Tensor) -> Tensor:
        Tk, has_k = _as_k("T", T, X, batched)
        return _with_k(lin.jvp(Tk), batched, has_k)

    return _unbatch(lin.out, batched), jvp_fn


def vjp(step, X: Tensor, *, C: Optional[Tensor] = None,
        backend: str = "auto") -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
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
    lin, batched = _linearize(step, X, C, backend)
    Y = _unbatch(lin.out, batched)

    def vjp_fn(G: Tensor) -> Tensor:
        Gk, has_k = _as_k("G", G, Y, batched)
        return _with_k(lin.vjp(Gk), batched, has_k)

    return Y, vjp_fn


def jacobian(step, X: Tensor, *, C: Optional[Tensor] = None, backend: str = "auto",
             max_gb: Optional[float] = None) -> Tensor:
    """The dense Jacobian of one step, token-major: entry [i*D + a, m*D + b] is dY[i, a] / dX[m, b].

    Returns [S*D, S*D], or [B, S*D, S*D] for a batched X. Refuses (ValueError, with the size in GB) an output over
    ``max_gb`` (default ``fastjac.config.dense_limit_gb``); use ``jvp``/``linearize`` then.

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(8, 2, norm="layer")
        >>> fj.jacobian(m, torch.randn(5, 8)).shape
        torch.Size([40, 40])
    """
    X3, _ = check_state(X)
    check_dense_size(X3.shape[1], X3.shape[2], X3.shape[0], X3.dtype, max_gb)
    lin, batched = _linearize(step, X, C, backend)
    return _unbatch(lin.dense(), batched)


def info(step, X: Optional[Tensor] = None, backend: str = "auto") -> str:
    """Which backend ``backend`` resolves to for (step, X), and why each other one was or was not usable.

    Example:
        >>> import fastjac as fj, torch
        >>> print(fj.info(fj.ItrSA(8, 2), torch.randn(3, 8)))  # doctest: +ELLIPSIS
        backend='auto' -> torch ...
    """
    if X is None:
        X = torch.zeros(1, 1, getattr(step, "dim", 1))
    X3, _ = check_state(X)
    chosen = backends.select(step, X3, backend).name
    return f"backend={backend!r} -> {chosen} ({backends.explain(step, X3)})"


__all__ = ["jvp", "vjp", "linearize", "jacobian", "info"]
