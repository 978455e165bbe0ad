"""Per-group normalisations ("l2", "rms", "layer", "none"): forward, JVP, VJP and dense blocks."""

from .ref import (
    NORMS,
    NormCache,
    NormParams,
    norm_cache,
    norm_forward,
    norm_jacobian_blocks,
    norm_jvp,
    norm_left_apply,
    norm_vjp,
)

__all__ = [
    "NORMS",
    "NormCache",
    "NormParams",
    "norm_cache",
    "norm_forward",
    "norm_jacobian_blocks",
    "norm_jvp",
    "norm_left_apply",
    "norm_vjp",
]
