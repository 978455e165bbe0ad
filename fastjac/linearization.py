"""The public seam: :class:`Linearization`, one step linearised at one state, whichever backend computed it.

    lin = fj.linearization(step, X, C=C)          # one forward pass
    lin.out                                       # step(X, C), X's shape
    lin.jvp(T)                                    # J T: T is X's shape or [k, *X.shape] (k tangents, one softmax)
    lin.vjp(G)                                    # Jᵀ G, G's shape
    lin.dense()                                   # [S*D, S*D] (or [B, S*D, S*D]), token-major

``fj.jvp``, ``fj.vjp``, ``fj.linearize`` and ``fj.jacobian`` are thin wrappers of it, and the analysis toolkit
(Lyapunov, spectra, pseudo-energy), training and distributed code reach a Jacobian only through it. Backends return
a :class:`fastjac.ops.base.BatchedLinearization` (always batched shapes); this class handles the user's shapes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends, config
from ._checks import NonFiniteError, check_dense_size, check_input, check_state, check_tangent
from .models import RecurrentStep
from .ops.base import BatchedLinearization

PARTS = ("step", "msa")


def prepare(step, X: Tensor, C: Optional[Tensor] = None, *, name: str = "X") -> Tuple[Tensor, Optional[Tensor], bool]:
    """Validate (step, X, C) once: returns (X as [B, S, D], C as [B, S, D] / [S, D] / None, whether X was batched).

    The one validation preamble of every public function: step is callable; X is a finite float [S, D] or
    [B, S, D] matching a fastjac model's dim, dtype and device, and the model's parameters are finite; C is None,
    X's shape or [S, D] for a batch, with X's dtype and device.
    """
    if not callable(step):
        raise TypeError(f"step: expected a fastjac model or a callable X -> X, got {type(step).__name__}")
    if isinstance(step, RecurrentStep) and isinstance(X, Tensor) and X.is_floating_point() and X.dim() in (2, 3):
        step.check_state(X, name)  # dim, dtype and device against the model first (a 'meta' X: a device mismatch)
    X3, batched = check_state(X, name=name)
    if isinstance(step, RecurrentStep):
        if config.check_finite:
            step.check_parameters()
    C = check_input(C, X)
    C3 = C if C is None or batched else C.unsqueeze(0)
    return X3, C3, batched


class Linearization:
    """One step linearised at X (any backend), in the shapes of ``fj.jvp``, ``fj.vjp`` and ``fj.jacobian``.

    Attributes:
        out: step(X, C), X's shape. X: the state. batched: whether X was [B, S, D]. backend: the backend's name.
        core: the backend's :class:`~fastjac.ops.base.BatchedLinearization` (batched shapes, for backend authors).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2)
        >>> lin = fj.linearization(m, torch.randn(7, 16))
        >>> lin.jvp(torch.randn(5, 7, 16)).shape, lin.vjp(torch.randn(7, 16)).shape, lin.dense().shape
        (torch.Size([5, 7, 16]), torch.Size([7, 16]), torch.Size([112, 112]))
    """

    def __init__(self, core: BatchedLinearization, X: Tensor, batched: bool, backend: str, check: bool = True):
        self.core, self.X, self.batched, self.backend, self.check = core, X, batched, backend, check

    @property
    def out(self) -> Tensor:
        return self.core.out if self.batched else self.core.out[0]

    def _apply(self, name: str, V: Tensor, fn) -> Tensor:
        if self.check:
            Vk, has_k = check_tangent(name, V, self.X)
        else:  # trusted loop: shapes only (no finiteness reduction, no host sync)
            has_k = V.dim() == self.X.dim() + 1
            Vk = V if has_k else V.unsqueeze(0)
        if Vk.shape[0] == 0:  # no tangents: nothing to compute (torch.func's vmap cannot take a zero batch)
            return V.clone()
        Y = fn(Vk if self.batched else Vk.unsqueeze(1))
        Y = Y if self.batched else Y.squeeze(1)
        return Y if has_k else Y[0]

    def jvp(self, T: Tensor) -> Tensor:
        """J T for one tangent (X's shape) or k tangents [k, *X.shape] (they share the forward and the softmax)."""
        return self._apply("T", T, self.core.jvp)

    def vjp(self, G: Tensor) -> Tensor:
        """Jᵀ G for one cotangent (X's shape) or k cotangents [k, *X.shape]."""
        return self._apply("G", G, self.core.vjp)

    def dense(self, *, max_gb: Optional[float] = None) -> Tensor:
        """The dense Jacobian [S*D, S*D] ([B, S*D, S*D] for a batched X), token-major: entry [i*D + a, m*D + b] is
        dY[i, a] / dX[m, b]. Refuses (ValueError with the size) an output over ``max_gb`` (default
        ``fastjac.config.dense_limit_gb``). Computed without an autograd graph unless X or the weights need one
        and grad mode is on (then it is differentiable, and costs about twice the memory)."""
        B, S, D = self.core.X.shape
        check_dense_size(S, D, B, self.X.dtype, max_gb)
        J = self.core.dense()
        return J if self.batched else J[0]

    def __repr__(self) -> str:
        return f"Linearization(backend={self.backend!r}, X={tuple(self.X.shape)}, {self.X.dtype})"


def linearization(
    step, X: Tensor, *, C: Optional[Tensor] = None, backend: str = "auto", part: str = "step", check: bool = True
) -> Linearization:
    """Linearise one step at X: one forward pass, then any number of JVPs, VJPs and a dense Jacobian.

    Args:
        step: a fastjac model (:class:`fastjac.RecurrentStep`: analytic path) or any callable X -> X (torch.func;
            called as ``step(X)``, or ``step(X, C)`` when C is given).
        X: [S, D] or [B, S, D] (samples of a batch are independent). C: injected input, X's shape, [S, D], or None.
        backend: "auto" or a registered backend's name (``fastjac.info`` lists them and says what "auto" picks).
        part: "step" (the whole step) or "msa" (dMSA/dX alone, fastjac attention models, torch ops).
        check: validate the inputs and every tangent (default). Loops that validated them once (a trajectory)
            may pass False: then only shapes are handled (no finiteness reductions, no host syncs).

    Returns:
        :class:`Linearization` with ``out``, ``jvp(T)``, ``vjp(G)``, ``dense()``.

    Example:
        >>> import fastjac as fj, torch
        >>> lin = fj.linearization(fj.ItrSA(8, 2, norm="layer"), torch.randn(3, 5, 8))
        >>> lin.out.shape, lin.dense().shape
        (torch.Size([3, 5, 8]), torch.Size([3, 40, 40]))
    """
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    if check:
        X3, C3, batched = prepare(step, X, C)
    else:
        batched = X.dim() == 3
        X3 = X if batched else X.unsqueeze(0)
        C3 = C if C is None or batched else C.unsqueeze(0)
    if part == "msa":
        if not callable(getattr(step, "msa_linearization", None)):
            if callable(getattr(step, "msa", None)):
                return Linearization(
                    backends.autograd_linearization(step.msa, X3, None, True, with_c=False), X, batched, "autograd"
                )
            raise TypeError(
                f"step: part='msa' needs a fastjac attention model or an object with a callable "
                f".msa(X); got {type(step).__name__}"
            )
        return Linearization(step.msa_linearization(X3), X, batched, "torch")
    be = backends.select(step, X3, backend)
    core = be.linearize(step, X3, C3, batched)
    if check and config.check_finite and not bool(torch.isfinite(core.out).all()):
        raise NonFiniteError(
            f"X: step(X) has inf/NaN entries although X, C and the weights are finite: the step "
            f"overflowed (largest |X| = {X3.abs().max().item():.3g}, {X3.dtype}); rescale X"
            + (" or use float64" if X3.dtype != torch.float64 else "")
        )
    return Linearization(core, X, batched, be.name, check)


__all__ = ["BatchedLinearization", "Linearization", "linearization", "prepare"]
