"""Multi-head softmax attention: forward, JVP, VJP and dense blocks (``ref.py``: torch ops; derivation in README.md)."""

from .ref import AttnCache, AttnParams, attention_probs, msa_cache, msa_forward, msa_jacobian_rows, msa_jvp, msa_vjp

__all__ = [
    "AttnCache",
    "AttnParams",
    "attention_probs",
    "msa_cache",
    "msa_forward",
    "msa_jacobian_rows",
    "msa_jvp",
    "msa_vjp",
]
