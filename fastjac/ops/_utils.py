"""Utilities shared by every op folder: interpreter detection, matmul precision, block sizes, feature grouping.

Nothing here imports triton, the models or the backends, so any op module (reference or kernel) may import it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

PRECISIONS = ("ieee", "tf32")

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import of the kernel module), so this is read once,
# at import: a kernel module imported with it set runs on the CPU interpreter for the rest of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def interpreter_on() -> bool:
    """Whether fastjac's Triton kernels run (or, once imported, will run) under Triton's CPU interpreter."""
    return INTERPRET


def pow2(n: int, lo: int = 16) -> int:
    """The next power of two >= max(n, lo): Triton's block shapes must be powers of two (tl.dot: >= 16)."""
    n = max(int(n), int(lo), 1)
    return 1 << (n - 1).bit_length()


def precision_for(dtype: torch.dtype, precision: Optional[str] = None) -> str:
    """The tl.dot input precision: "tf32" only for float32 operands when asked (fastjac.config.matmul_precision)."""
    if precision is None:
        from .. import config

        precision = config.matmul_precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return "tf32" if (precision == "tf32" and dtype == torch.float32) else "ieee"


def group(x: Tensor, N: int) -> Tensor:
    """Split the last dim into groups of N: [..., D] -> [..., D // N, N] (a view)."""
    return x.unflatten(-1, (x.shape[-1] // N, N))


def blockdiag(blk: Tensor) -> Tensor:
    """[..., G, N, N] per-group blocks -> the block-diagonal [..., G*N, G*N]."""
    G, N = blk.shape[-3], blk.shape[-1]
    eye = torch.eye(G, dtype=blk.dtype, device=blk.device)
    return torch.einsum("...gnm,gh->...gnhm", blk, eye).reshape(*blk.shape[:-3], G * N, G * N)


def current_arch(device=None) -> Optional[int]:
    """The GPU architecture fastjac's launch table is keyed by: 90 (compute capability 9.x, H100-class), 80 (8.x,
    A100-class; other CUDA capabilities also map here, unverified), or None without CUDA / under the interpreter."""
    if INTERPRET or not torch.cuda.is_available():
        return None
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(dev)
    return 90 if major == 9 else 80


def compiled_ops():
    """``torch.ops.fastjac``, the C++ extension's custom ops (csrc/), once ``fastjac.backends.cpp.load()`` loaded it.

    The op layer only uses the ops; building and loading the library belongs to the backend above it (backend
    ``"cpp"`` loads it before it creates a linearisation).
    """
    ns = torch.ops.fastjac
    if not hasattr(ns, "attn_jvp"):
        raise RuntimeError(
            "the compiled fastjac extension is not loaded: call fastjac.backends.cpp.load() (it builds "
            "on first use) or use backend='cpp'"
        )
    return ns
