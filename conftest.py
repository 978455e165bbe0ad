"""Loaded by pytest before anything is collected (tests and the doctests of fastjac's modules alike).

Without a CUDA device the Triton kernels run on Triton's CPU interpreter, as Triton's own CI does. Triton reads
TRITON_INTERPRET when a kernel is decorated (``triton.jit``), i.e. when fastjac's kernel modules are imported, so it
is set here, before any module imports fastjac. With a CUDA device the kernels are compiled for it instead.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
