"""fastjac: exact Jacobians of recurrent self-attention, fast, and the dynamical-systems toolkit built on them.

    import fastjac as fj
    model = fj.ItrSA(dim=64, heads=4)
    Y, JT = fj.jvp(model, X, T)        # one or k tangents
    J = fj.jacobian(model, X)          # dense [S*D, S*D], token-major
    res = fj.lyapunov_spectrum(model, X, k=32, steps=1000)   # Benettin/QR

See README.md and DESIGN.md (shared) for the mathematics and the public contract.
"""
from . import config, ops
from .api import info, jacobian, jvp, linearize, vjp
from .backends import register_backend
from .lyapunov import LyapunovResult, finite_time_lyapunov, lyapunov_spectrum
from .models import AKOrN, ItrSA

__version__ = "0.1.0"

__all__ = ["AKOrN", "ItrSA", "LyapunovResult", "config", "finite_time_lyapunov", "info", "jacobian", "jvp", "linearize",
           "lyapunov_spectrum", "ops", "register_backend", "vjp"]
