"""The primitive ops, one folder each: ``attention``, ``norm``, ``akorn`` and the composed ``step``.

Each folder's ``ref.py`` holds the analytic derivatives in torch ops (``backend="torch"``), which are also the
readable reference for the fused kernels that sit beside them.
"""

from .akorn import antisym, omega_apply, omega_vjp, proj_forward, proj_jvp, proj_vjp
from .attention import (
    AttnCache,
    AttnParams,
    attention_probs,
    msa_cache,
    msa_forward,
    msa_jacobian_rows,
    msa_jvp,
    msa_vjp,
)
from .norm import (
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
from .qr import qr
from .step import AKOrNLinearization, AKOrNParams, ItrSALinearization, ItrSAParams, StepLinearization
