"""What a backend is: a name, a test of whether it can linearise (step, X), and the linearisation itself."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import Tensor

from ..ops.base import BatchedLinearization

# factory(step, X [B, S, D], C [B, S, D] | [S, D] | None) -> BatchedLinearization
Linearizer = Callable[..., BatchedLinearization]


class Backend:
    """Subclass and register with :func:`fastjac.backends.register_backend`; ``fj.info`` then lists it."""

    name: str = ""
    #: whether gradients flow through this backend's linearisations to X and the weights (the training
    #: regularisers accept only such backends; "auto" declines the others when a gradient may be wanted). Off by
    #: default: a backend says so only when it has been tested for it.
    differentiable: bool = False

    def why_not(self, step, X: Tensor) -> Optional[str]:
        """None if this backend can linearise ``step`` at X [B, S, D], else the reason it cannot."""
        raise NotImplementedError

    def auto_why_not(self, step, X: Tensor) -> Optional[str]:
        """As why_not, for "auto"'s choice: a backend may be usable by name yet not worth picking automatically."""
        return self.why_not(step, X)

    def linearize(self, step, X: Tensor, C: Optional[Tensor], batched: bool) -> BatchedLinearization:
        raise NotImplementedError


class KernelBackend(Backend):
    """A backend of fused kernels that knows some model classes: a table ``model class -> linearizer``.

    The table is keyed by the exact class (no subclass lookup), so a subclass that changes the maths never gets
    its parent's kernels silently: it registers its own (:func:`fastjac.backends.register_linearizer`), or the
    backend says it does not know it.
    """

    def __init__(self):
        self.linearizers: Dict[type, Linearizer] = {}

    def register(self, model_cls: type, factory: Linearizer) -> None:
        self.linearizers[model_cls] = factory

    def model_why_not(self, step) -> Optional[str]:
        if type(step) not in self.linearizers:
            known = ", ".join(sorted(c.__name__ for c in self.linearizers)) or "none"
            return (
                f"no {self.name} kernels are registered for {type(step).__name__} (registered: {known}; see "
                f"fastjac.backends.register_linearizer)"
            )
        return None

    def linearize(self, step, X, C, batched):
        return self.linearizers[type(step)](step, X, C)


def needs_weight_grad(step, X: Tensor) -> Optional[str]:
    """Why a non-differentiable kernel backend must not be picked by "auto" here, or None.

    The fused kernels give no gradient to X or the weights. Picking them while autograd would want one would hand
    the user zero gradients silently, so "auto" declines whenever grad mode is on and X or a parameter requires
    grad (the analysis functions run under no_grad, so they still get the kernels).
    """
    import torch

    if not torch.is_grad_enabled():
        return None
    params = step.parameters() if hasattr(step, "parameters") else ()
    if X.requires_grad or any(p.requires_grad for p in params):
        return (
            "gradients may be wanted (grad mode on and X or a weight requires grad) and these kernels are not "
            "differentiable: 'auto' uses a differentiable backend; wrap the call in torch.no_grad() (or pass "
            "this backend by name) to use the kernels"
        )
    return None


class UnavailableBackend(Backend):
    """Stands in for a backend whose module failed to import, so that its name explains why."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def why_not(self, step, X):
        return self.reason
