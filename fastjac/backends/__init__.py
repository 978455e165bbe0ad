"""Backends: who computes a linearisation, and how ``backend="auto"`` chooses. One registry, built from what is
registered (``fj.info`` lists every registered backend).

A backend turns ``(step, X [B, S, D], C)`` into a :class:`fastjac.ops.base.BatchedLinearization`.

- ``"autograd"`` (``autograd.py``): torch.func on the plain forward of any callable; the reference every fast
  path is tested against.
- ``"torch"`` (``torch.py``): a fastjac model's analytic linearisation in torch ops, any device.
- ``"triton"`` (``triton.py``): the Triton kernels, first choice of "auto" on CUDA tensors.
- more (the compiled ``"cpp"`` backend) register themselves with :func:`register_backend`; kernel backends know
  model classes through a table (:func:`register_linearizer`), never by falling back silently.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import Tensor

from .autograd import AutogradBackend, AutogradLinearization, autograd_linearization
from .base import Backend, KernelBackend, Linearizer, UnavailableBackend
from .torch import TorchBackend

_BACKENDS: Dict[str, Backend] = {}
# the order "auto" tries
_AUTO_ORDER: List[str] = []


def register_backend(backend: Backend, auto_priority: Optional[int] = None) -> None:
    """Add (or replace) a backend under ``backend.name``; with ``auto_priority`` it joins "auto"'s list at that
    position (0 = tried first).

    Example:
        >>> import fastjac as fj
        >>> "torch" in fj.backends.available()
        True
    """
    if not isinstance(backend, Backend) or not isinstance(backend.name, str) or not backend.name:
        raise TypeError(f"backend: expected a fastjac.backends.Backend with a name, got {backend!r}")
    if backend.name == "auto":
        raise ValueError("backend: 'auto' is reserved")
    _BACKENDS[backend.name] = backend
    if auto_priority is not None and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(auto_priority, backend.name)


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a plugin's own, or one a test registered)."""
    get(name)
    del _BACKENDS[name]
    if name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)


def available() -> List[str]:
    """The names of every registered backend (usable or not on this machine: ``explain`` says which)."""
    return list(_BACKENDS)


def get(name: str) -> Backend:
    """The registered backend object called ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {['auto'] + available()}, got {name!r}")
    return _BACKENDS[name]


def register_linearizer(backend: str, model_cls: type, factory: Linearizer) -> None:
    """Teach a kernel backend (e.g. "triton") a model class: ``factory(step, X, C) -> BatchedLinearization``."""
    be = get(backend)
    if not isinstance(be, KernelBackend):
        raise ValueError(f"backend: {backend!r} has no per-model table (it is a {type(be).__name__})")
    be.register(model_cls, factory)


def select(step, X: Tensor, backend="auto") -> Backend:
    """The backend object for ``backend`` (a name), or the first that supports the inputs for "auto".

    A :class:`Backend` object is returned as it is: a loop resolves its backend once per run (``"auto"``'s checks
    can cost milliseconds: the C++ backend's build-cache lookup) and passes the object on every step.
    """
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, one of {['auto'] + available()}, got {type(backend).__name__}")
    if backend == "auto":
        for name in _AUTO_ORDER:
            if _BACKENDS[name].auto_why_not(step, X) is None:
                return _BACKENDS[name]
        raise ValueError("backend: no backend supports this step: " + explain(step, X))
    be = get(backend)
    reason = be.why_not(step, X)
    if reason is not None:
        raise ValueError(f"backend: {backend!r} cannot handle this input: {reason}")
    return be


def explain(step, X: Tensor) -> str:
    """One clause per registered backend: 'ok' or why "auto" would not pick it for (step, X [B, S, D])."""
    lines = []
    for name, be in _BACKENDS.items():
        why = be.auto_why_not(step, X)
        lines.append(f"{name}: {'ok' if why is None else why}")
    return "; ".join(lines)


def _register_triton() -> None:
    # a missing or broken triton must not break `import fastjac`: the backend then only says why it is missing
    try:
        from .triton import make_backend
    except Exception as e:  # pragma: no cover - depends on the installation
        register_backend(UnavailableBackend("triton", f"fastjac.backends.triton failed to import ({e})"))
        return
    register_backend(make_backend(), auto_priority=0)


def _register_cpp() -> None:
    # the compiled C++ backend: registered for "auto" only where it can be built or was (fastjac/backends/cpp.py
    # decides when "auto" picks it); nothing is compiled here
    try:
        from . import cpp

        reason = cpp.toolchain_why_not()
        if reason is not None and not cpp.is_built():
            register_backend(UnavailableBackend("cpp", f"the C++ extension cannot be built: {reason}"))
            return
    except Exception as e:  # pragma: no cover - depends on the installation
        register_backend(UnavailableBackend("cpp", f"fastjac.backends.cpp failed to import ({e})"))
        return
    register_backend(cpp.make_backend(), auto_priority=0)


# torch.func on the plain forward: differentiable by construction (set here; the class lives in autograd.py)
AutogradBackend.differentiable = True


def differentiable_backends() -> List[str]:
    """The names of the registered backends whose linearisations carry gradients (``Backend.differentiable``).

    Example:
        >>> import fastjac as fj
        >>> sorted(fj.backends.differentiable_backends())
        ['autograd', 'torch']
    """
    return [name for name, be in _BACKENDS.items() if be.differentiable]


register_backend(TorchBackend(), auto_priority=0)
register_backend(AutogradBackend(), auto_priority=1)
_register_triton()
_register_cpp()

__all__ = [
    "AutogradLinearization",
    "Backend",
    "KernelBackend",
    "UnavailableBackend",
    "autograd_linearization",
    "available",
    "differentiable_backends",
    "explain",
    "get",
    "register_backend",
    "register_linearizer",
    "select",
    "unregister_backend",
]
