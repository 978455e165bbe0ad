"""``backend="torch"``: a model's own analytic linearisation (``RecurrentStep.linearize_analytic``) in torch ops.

Any device, any floating dtype, differentiable in the weights (the training regularisers rely on it).
"""

from __future__ import annotations

from typing import Optional

from ..models import RecurrentStep
from .base import Backend


def _defining_class(cls: type, attr: str) -> Optional[type]:
    return next((c for c in cls.__mro__ if attr in c.__dict__), None)


class TorchBackend(Backend):
    name = "torch"
    differentiable = True  # torch ops throughout: gradients reach X and the weights

    def why_not(self, step, X):
        if not isinstance(step, RecurrentStep):
            return f"step is a {type(step).__name__}, not a fastjac model (a fastjac.RecurrentStep)"
        fwd = _defining_class(type(step), "forward")
        lin = _defining_class(type(step), "linearize_analytic")
        if lin is None or lin is RecurrentStep:
            return f"{type(step).__name__} defines no linearize_analytic"
        if fwd is not None and lin is not fwd and issubclass(fwd, lin):
            # forward was redefined below the class whose Jacobian we would use: that Jacobian is not this step's
            return (
                f"{type(step).__name__} overrides forward (in {fwd.__name__}) but inherits linearize_analytic "
                f"from {lin.__name__}, whose Jacobian is not this step's; define linearize_analytic"
            )
        return None

    def linearize(self, step, X, C, batched):
        return step.linearize_analytic(X, C)
