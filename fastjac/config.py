"""Process-wide settings.

``dense_limit_gb``: the largest dense Jacobian (its output alone) that ``fastjac.jacobian`` will allocate, in GB
(1e9 bytes). Default 4, or the environment variable ``FASTJAC_DENSE_LIMIT_GB``. Per call, pass ``max_gb=``.

``check_finite``: validate that states, inputs and tangents are finite on every call (default True). A check costs
one reduction and, on a GPU, a host sync; long trusted loops may switch it off.

``matmul_precision``: operand precision of the float32 matrix products inside the Triton kernels (``backend=
"triton"``): "ieee" (default, exact float32 products) or "tf32" (tensor-core TF32 operands, 10-bit mantissa: about
1e-3 relative error in JVPs; faster on Ampere and later GPUs). Environment variable ``FASTJAC_MATMUL_PRECISION``.
float64 inputs always use "ieee"; the torch and autograd backends ignore it (they follow torch's own settings).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

dense_limit_gb: float = float(os.environ.get("FASTJAC_DENSE_LIMIT_GB", "4"))
check_finite: bool = True
MATMUL_PRECISIONS = ("ieee", "tf32")
matmul_precision: str = os.environ.get("FASTJAC_MATMUL_PRECISION", "ieee")


def set_dense_limit_gb(gb: float) -> None:
    """Set the dense-Jacobian memory limit in GB (1e9 bytes)."""
    global dense_limit_gb
    if not (isinstance(gb, (int, float)) and gb > 0):
        raise ValueError(f"gb: expected a positive number, got {gb!r}")
    dense_limit_gb = float(gb)


def set_matmul_precision(precision: str) -> None:
    """Set the Triton kernels' float32 matmul operand precision: "ieee" (default) or "tf32"."""
    global matmul_precision
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision: expected one of {MATMUL_PRECISIONS}, got {precision!r}")
    matmul_precision = precision


@contextmanager
def settings(**kw):
    """Temporarily change settings: ``with fastjac.config.settings(check_finite=False): ...``."""
    g = globals()
    for k in kw:
        if k not in ("dense_limit_gb", "check_finite", "matmul_precision"):
            raise TypeError(f"settings: unknown setting {k!r}")
    if "matmul_precision" in kw and kw["matmul_precision"] not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision: expected one of {MATMUL_PRECISIONS}, got {kw['matmul_precision']!r}")
    old = {k: g[k] for k in kw}
    g.update(kw)
    try:
        yield
    finally:
        g.update(old)
