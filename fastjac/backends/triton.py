"""The ``backend="triton"`` backend: fastjac models on the Triton kernels of ``fastjac/ops/*/triton.py``.

"auto" picks it first for fastjac models on CUDA tensors. On the CPU it runs only when asked for by name and the
kernels were decorated for Triton's interpreter (``TRITON_INTERPRET=1`` set before fastjac's kernels are imported,
as the tests do): the interpreter is for testing, orders of magnitude slower than ``backend="torch"``.

Triton is imported lazily, on the first question about a fastjac model, so ``import fastjac`` works without it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..models import AKOrN, ItrSA
from ..ops._utils import interpreter_on
from .base import KernelBackend, needs_weight_grad

# bfloat16 only off the interpreter (numpy, hence the interpreter, has no bfloat16); half inputs accumulate in float32
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16) + (() if interpreter_on() else (torch.bfloat16,))
_kernels = None  # the step module once imported, or the import error's text


def _step_module():
    """fastjac.ops.step.triton, or a string saying why it cannot be imported."""
    global _kernels
    if _kernels is None:
        try:
            from ..ops.step import triton as mod

            _kernels = mod
        except Exception as e:  # no triton, or a triton whose API the kernels do not compile against
            _kernels = f"triton is not installed or failed to import ({type(e).__name__}: {e})"
    return _kernels


class TritonBackend(KernelBackend):
    name = "triton"

    def why_not(self, step, X: Tensor) -> Optional[str]:
        reason = self.model_why_not(step)
        if reason is not None:
            return reason
        mod = _step_module()
        if isinstance(mod, str):
            return mod
        interp = interpreter_on()
        if X.dtype not in SUPPORTED_DTYPES:
            extra = " (the Triton interpreter has no bfloat16: it runs on CUDA only)" if interp else ""
            return (
                f"dtype {X.dtype} is not supported by the Triton kernels: float32, float64, float16 or bfloat16{extra}"
            )
        if X.device.type != "cuda" and not interp:
            return (
                f"X is on {X.device.type}, not CUDA, and the Triton interpreter is off (set TRITON_INTERPRET=1 "
                f"before importing fastjac to run the kernels on the CPU, slowly, e.g. for tests)"
            )
        return None

    def auto_why_not(self, step, X: Tensor) -> Optional[str]:
        reason = self.why_not(step, X)
        if reason is None and X.device.type != "cuda":
            return (
                f"X is on {X.device.type}: 'auto' never picks the Triton interpreter (TRITON_INTERPRET=1 is for "
                f"tests, far slower than 'torch'); pass backend='triton' to use it"
            )
        return reason if reason is not None else needs_weight_grad(step, X)


def _itrsa(step, X, C):
    return _step_module().TritonItrSALinearization(X, C, step.step_params())


def _akorn(step, X, C):
    return _step_module().TritonAKOrNLinearization(X, C, step.step_params())


def make_backend() -> TritonBackend:
    be = TritonBackend()
    be.register(ItrSA, _itrsa)
    be.register(AKOrN, _akorn)
    return be
