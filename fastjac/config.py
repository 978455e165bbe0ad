"""Process-wide settings.

``dense_limit_gb``: the largest dense Jacobian (its output alone) that ``fastjac.jacobian`` will allocate, in GB
(1e9 bytes). Default 4, or the environment variable ``FASTJAC_DENSE_LIMIT_GB``. Per call, pass ``max_gb=``.

``check_finite``: validate that states, inputs and tangents are finite on every call (default True). A check costs
one reduction and, on a GPU, a host sync; long trusted loops may switch it off.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

dense_limit_gb: float = float(os.environ.get("FASTJAC_DENSE_LIMIT_GB", "4"))
check_finite: bool = True


def set_dense_limit_gb(gb: float) -> None:
    """Set the dense-Jacobian memory limit in GB (1e9 bytes)."""
    global dense_limit_gb
    if not (isinstance(gb, (int, float)) and gb > 0):
        raise ValueError(f"gb: expected a positive number, got {gb!r}")
    dense_limit_gb = float(gb)


@contextmanager
def settings(**kw):
    """Temporarily change settings: ``with fastjac.config.settings(check_finite=False): ...``."""
    g = globals()
    for k in kw:
        if k not in ("dense_limit_gb", "check_finite"):
            raise TypeError(f"settings: unknown setting {k!r}")
    old = {k: g[k] for k in kw}
    g.update(kw)
    try:
        yield
    finally:
        g.update(old)
