"""The analysis toolkit on top of the linearisation seam: spectra and bounds, Lyapunov exponents, the pseudo-energy
monitor, the energies of Props 4.1/4.2 and the oscillator step. Everything here reaches a step's Jacobian only
through ``fastjac.linearization`` (the public seam)."""

from . import energy, lyapunov, oscillation, pseudo_energy, spectra

__all__ = ["energy", "lyapunov", "oscillation", "pseudo_energy", "spectra"]
