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

import math
import os
import warnings
from contextlib import contextmanager

DEFAULT_DENSE_LIMIT_GB = 4.0
MATMUL_PRECISIONS = ("ieee", "tf32")


def _valid_gb(name: str, gb) -> float:
    if isinstance(gb, bool) or not isinstance(gb, (int, float)):
        raise TypeError(f"{name}: expected a positive number of GB, got {type(gb).__name__} {gb!r}")
    if not (math.isfinite(gb) and gb > 0):
        raise ValueError(f"{name}: expected a positive number of GB (finite), got {gb!r}")
    return float(gb)


def _valid_precision(name: str, precision) -> str:
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"{name}: expected one of {MATMUL_PRECISIONS}, got {precision!r}")
    return precision


def _from_env(var: str, parse, default):
    """A setting from the environment; a bad value warns and keeps the default (importing must not fail)."""
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return parse(var, raw)
    except (TypeError, ValueError) as e:
        warnings.warn(
            f"fastjac.config: ignoring {var}={raw!r} ({e}); using the default {default!r}", RuntimeWarning, stacklevel=3
        )
        return default


def _parse_gb(var: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ValueError("not a number") from None
    return _valid_gb(var, v)


dense_limit_gb: float = _from_env("FASTJAC_DENSE_LIMIT_GB", _parse_gb, DEFAULT_DENSE_LIMIT_GB)
check_finite: bool = True
# backend="autograd" routes F.scaled_dot_product_attention to fastjac.nn's forward-mode-capable one (docs/own_models.md)
sdpa_forward_ad: bool = True
matmul_precision: str = _from_env(
    "FASTJAC_MATMUL_PRECISION", lambda var, raw: _valid_precision(var, raw.strip()), "ieee"
)


def set_dense_limit_gb(gb: float) -> None:
    """Set the dense-Jacobian memory limit in GB (1e9 bytes): a positive, finite number."""
    global dense_limit_gb
    dense_limit_gb = _valid_gb("gb", gb)


def set_matmul_precision(precision: str) -> None:
    """Set the Triton kernels' float32 matmul operand precision: "ieee" (default) or "tf32"."""
    global matmul_precision
    matmul_precision = _valid_precision("precision", precision)


def _valid_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__} {v!r}")
    return v


_VALIDATE = {
    "dense_limit_gb": lambda v: _valid_gb("dense_limit_gb", v),
    "check_finite": lambda v: _valid_bool("check_finite", v),
    "matmul_precision": lambda v: _valid_precision("matmul_precision", v),
    "sdpa_forward_ad": lambda v: _valid_bool("sdpa_forward_ad", v),
}


@contextmanager
def settings(**kw):
    """Temporarily change settings: ``with fastjac.config.settings(check_finite=False): ...``."""
    g = globals()
    for k in kw:
        if k not in _VALIDATE:
            raise TypeError(f"settings: unknown setting {k!r}")
    kw = {k: _VALIDATE[k](v) for k, v in kw.items()}
    old = {k: g[k] for k in kw}
    g.update(kw)
    try:
        yield
    finally:
        g.update(old)
