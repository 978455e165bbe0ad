"""fastjac: exact Jacobians of recurrent self-attention, fast, and the dynamical-systems toolkit built on them.

    import fastjac as fj
    model = fj.ItrSA(dim=64, heads=4)
    Y, JT = fj.jvp(model, X, T)        # one or k tangents
    J = fj.jacobian(model, X)          # dense [S*D, S*D], token-major
    res = fj.lyapunov_spectrum(model, X, k=32, steps=1000)   # Benettin/QR

See README.md and docs/design.md for the mathematics and the public contract.
"""

from . import analysis, backends, config, linalg, ops
from .analysis import energy, lyapunov, oscillation, pseudo_energy, spectra
from .analysis.lyapunov import LyapunovResult, finite_time_lyapunov, lyapunov_spectrum
from .analysis.pseudo_energy import PseudoEnergyTrace, pseudo_energy_trace
from .analysis.spectra import Prop51Result, eigvals, linear_operator, prop51_bound, spectral_norm
from .api import info, jacobian, jvp, linearize, vjp
from .backends import register_backend, register_linearizer
from .linearization import Linearization, linearization
from .models import AKOrN, ItrSA, RecurrentStep, load_model, register_model, save_model
from .own_model import as_step, check_step

__version__ = "0.3.0"

# Subsystems imported on first use (``fj.regularizers``, ``fj.train``, ``fj.data``, ``fj.distributed``), so that
# ``import fastjac`` stays light and never touches torch.distributed or the training code unless asked.
_LAZY = {
    "regularizers": "fastjac.train.regularizers",
    "train": "fastjac.train",
    "data": "fastjac.data",
    "distributed": "fastjac.distributed",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name])
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'fastjac' has no attribute {name!r}")


__all__ = [
    "AKOrN",
    "ItrSA",
    "Linearization",
    "LyapunovResult",
    "RecurrentStep",
    "backends",
    "linearization",
    "register_linearizer",
    "Prop51Result",
    "PseudoEnergyTrace",
    "config",
    "eigvals",
    "energy",
    "finite_time_lyapunov",
    "info",
    "jacobian",
    "jvp",
    "linalg",
    "linear_operator",
    "linearize",
    "load_model",
    "register_model",
    "save_model",
    "lyapunov_spectrum",
    "ops",
    "oscillation",
    "prop51_bound",
    "pseudo_energy_trace",
    "register_backend",
    "spectral_norm",
    "vjp",
]
__all__ += ["as_step", "check_step"]  # your own model as a step (fastjac/own_model.py)
