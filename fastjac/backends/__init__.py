"""Backends: who computes a linearisation, and how ``backend="auto"`` chooses.

A backend turns ``(step, X [B, S, D], C)`` into a linearisation object with ``out`` [B, S, D] and methods
``jvp(T [k, B, S, D])``, ``vjp(G [k, B, S, D])`` and ``dense(out=None) -> [B, S*D, S*D]``.

- ``"autograd"``: torch.func on the plain forward of any callable; the reference every fast path is tested against.
- ``"torch"``: the analytic formulas of ``fastjac.ops`` in batched torch ops, for fastjac models, on any device.
- ``"triton"``: the Triton kernels (``fastjac/triton_backend.py``), first choice of "auto" on CUDA tensors.
- later kinds (``"cuda"``) register themselves with :func:`register_backend`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..models import AKOrN, ItrSA
from ..ops.step.ref import DENSE_CHUNK_BYTES

FASTJAC_MODELS = (ItrSA, AKOrN)


class Backend:
    name: str = ""

    def why_not(self, step, X: Tensor) -> Optional[str]:
        """None if this backend can linearise ``step`` at X, else the reason it cannot."""
        raise NotImplementedError

    def auto_why_not(self, step, X: Tensor) -> Optional[str]:
        """As why_not, for "auto"'s choice: a backend may be usable by name yet not worth picking automatically."""
        return self.why_not(step, X)

    def linearize(self, step, X: Tensor, C: Optional[Tensor], batched: bool):
        raise NotImplementedError


class UnavailableBackend(Backend):
    """Stands in for a backend whose module failed to import, so that its name explains why."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def why_not(self, step, X):
        return self.reason


class TorchBackend(Backend):
    name = "torch"

    def why_not(self, step, X):
        if not isinstance(step, FASTJAC_MODELS):
            return f"step is a {type(step).__name__}, not a fastjac model (ItrSA, AKOrN)"
        return None

    def linearize(self, step, X, C, batched):
        return step.linearize_analytic(X, C)


class AutogradLinearization:
    """torch.func on a callable. ``f`` maps the batched state [B, S, D] to [B, S, D]."""

    def __init__(self, f: Callable[[Tensor], Tensor], X: Tensor):
        self.f, self.X = f, X
        # the reverse-mode closure is built on the first vjp only: JVP-only users (Lyapunov) pay one forward
        self.out, self._vjp_cache = f(X), None
        if self.out.shape != X.shape:
            raise ValueError(f"step: a step must map X to X's shape, got {tuple(self.out.shape)} from "
                             f"{tuple(X.shape)}")

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


class AutogradBackend(Backend):
    name = "autograd"

    def why_not(self, step, X):
        return None if callable(step) else f"step is a {type(step).__name__}, which is not callable"

    def linearize(self, step, X, C, batched):
        def f(X3: Tensor) -> Tensor:
            x = X3 if batched else X3[0]
            y = step(x) if C is None else step(x, C if batched else C[0])
            if not isinstance(y, Tensor):
                raise TypeError(f"step: expected it to return a Tensor, got {type(y).__name__}")
            return y if batched else y.unsqueeze(0)

        return AutogradLinearization(f, X)


_BACKENDS: Dict[str, Backend] = {}
# the order "auto" tries; a backend registered later with auto_priority=0 goes first
_AUTO_ORDER: List[str] = []


def register_backend(backend: Backend, auto_priority: Optional[int] = None) -> None:
    """Add a backend under ``backend.name``; with ``auto_priority`` it joins "auto"'s list at that position."""
    _BACKENDS[backend.name] = backend
    if auto_priority is not None and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(auto_priority, backend.name)


register_backend(TorchBackend(), auto_priority=0)
register_backend(AutogradBackend(), auto_priority=1)


def _register_triton() -> None:
    # a missing or broken triton must not break `import fastjac`: the backend then only says why it is missing
    try:
        from .triton import TritonBackend
    except Exception as e:  # pragma: no cover - depends on the installation
        register_backend(UnavailableBackend("triton", f"fastjac.backends.triton failed to import ({e})"))
        return
    register_backend(TritonBackend(), auto_priority=0)


_register_triton()

KNOWN = ("auto", "triton", "torch", "autograd", "cuda")


def select(step, X: Tensor, backend: str = "auto") -> Backend:
    """The backend object for ``backend`` (a name), or the first that supports the inputs for "auto"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, one of {KNOWN}, got {type(backend).__name__}")
    if backend == "auto":
        for name in _AUTO_ORDER:
            if _BACKENDS[name].auto_why_not(step, X) is None:
                return _BACKENDS[name]
        raise ValueError("backend: no backend supports this step: " + explain(step, X))
    if backend not in _BACKENDS:
        if backend in KNOWN:
            raise ValueError(f"backend: {backend!r} is not available in this build of fastjac "
                             f"(available: {sorted(_BACKENDS)})")
        raise ValueError(f"backend: expected one of {KNOWN}, got {backend!r}")
    reason = _BACKENDS[backend].why_not(step, X)
    if reason is not None:
        raise ValueError(f"backend: {backend!r} cannot handle this input: {reason}")
    return _BACKENDS[backend]


def explain(step, X: Tensor) -> str:
    lines = []
    for name in KNOWN[1:]:
        if name not in _BACKENDS:
            lines.append(f"{name}: not available in this build")
            continue
        why = _BACKENDS[name].auto_why_not(step, X)
        lines.append(f"{name}: {'ok' if why is None else why}")
    return "; ".join(lines)
