"""AKOrN's per-oscillator tangent projection Proj_X and anti-symmetric rotation Omega."""

from .ref import antisym, omega_apply, omega_vjp, proj_forward, proj_jvp, proj_vjp

__all__ = ["antisym", "omega_apply", "omega_vjp", "proj_forward", "proj_jvp", "proj_vjp"]
