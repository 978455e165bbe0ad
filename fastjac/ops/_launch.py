"""The launch table: every tile shape, ``num_warps`` and ``num_stages`` a Triton launcher of fastjac may use on a GPU.

Each launcher asks :func:`config` for its kernel, the GPU architecture (80 = A100-class sm_80, 90 = H100-class
sm_90, from ``torch.cuda.get_device_capability``), the dtype class and one problem-size bucket, and launches exactly
that entry; nothing else is ever compiled on a GPU. ``python -m fastjac aot`` (``fastjac/ops/_aot.py``) compiles
every entry of :data:`TABLE` for sm_80 and sm_90 (and the configurations the launchers derive from it over a grid of
problem shapes) and ``tests/test_aot.py`` fails if one exceeds the architecture's shared memory or register budget,
spills, or leaves a TF32 / bfloat16 / float16 / float64 product off the tensor cores.

Buckets (a problem outside every bucket raises instead of compiling an unverified configuration):

- ``attn_fwd`` / ``attn_jvp``: BDH = the head dim rounded up to a power of two (16 ... 128). The value dim is tiled
  by the entry's BV on the launch grid, so any dv uses the same entry. ``DSPLIT`` (tangent kernel; default 1)
  splits the head-dim products in two halves.
- ``norm``: W = BG * BN, the padded width of one row (buckets 1024, 4096, 8192); the entry's ``elems`` is the
  tile size BR * W, so BR = max(1, elems // W).
- ``dense``: BB = the feature tile, min(64, next power of two of D) (16, 32, 64).
- ``qr_gram`` / ``qr_gram_apply`` / ``qr_apply``: BLOCK_K = k rounded up to a power of two (16 ... 128).

Under ``TRITON_INTERPRET=1`` (``arch=None``) the launchers keep small tiles of their own (ragged edges for tests);
those never reach a GPU compiler and are not in this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

ARCHS = (80, 90)
# largest dynamic shared memory per block (opt-in), bytes; Triton raises OutOfResources above it
SHARED_LIMIT = {80: 166912, 90: 232448}
REGS_PER_SM = 65536  # 32-bit registers per SM (and per block) on sm_80 and sm_90
MAX_REGS_PER_THREAD = 255
DCLASSES = ("fp32", "tf32", "bf16", "fp16", "fp64")

# capture mode of the AOT check: launchers behave as on a GPU of this architecture (see _aot.capture)
ARCH_OVERRIDE: Optional[int] = None


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles (kernel constexpr name -> value), warps and pipeline stages of one table entry."""

    tiles: Tuple[Tuple[str, int], ...]
    num_warps: int
    num_stages: int

    def __getitem__(self, name: str) -> int:
        return dict(self.tiles)[name]

    def options(self) -> Dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def _c(w: int, s: int, **tiles: int) -> LaunchConfig:
    return LaunchConfig(tuple(tiles.items()), w, s)


# (kernel, arch, dtype class, bucket) -> LaunchConfig. Chosen from the AOT check's numbers (bench/results/aot_*.md):
# the largest tiles that fit both the shared-memory limit and the register file with zero spill bytes, preferring
# BM, BN >= 32 where tensor cores run (tl.dot needs >= 16 per side). No timing went into these choices (no GPU).
TABLE: Dict[Tuple[str, int, str, int], LaunchConfig] = {}


def _fill():
    T = TABLE
    for a in ARCHS:
        # ---- attention forward: o and the row log-sum-exp, online softmax over key tiles
        for bdh in (16, 32, 64, 128):
            bv = min(bdh, 64)
            # IEEE float32: FFMA products, no tensor cores; register bound
            T[("attn_fwd", a, "fp32", bdh)] = (
                _c(4, 2, BM=64, BN=32, BV=bv)
                if bdh <= 32
                else _c(8, 2, BM=64, BN=32, BV=bv)
                if bdh == 64
                else _c(8, 2, BM=32 if a == 80 else 16, BN=32, BV=64)
            )
            T[("attn_fwd", a, "fp64", bdh)] = (
                _c(4, 2, BM=32, BN=32, BV=bv) if bdh <= 64 else _c(8, 1, BM=32, BN=32, BV=64)
            )
            # TF32 / bfloat16 / float16: mma.sync (sm_80) / wgmma (sm_90)
            T[("attn_fwd", a, "tf32", bdh)] = (
                _c(8 if (a == 80 and bdh != 32) else 4, 3, BM=64, BN=64, BV=bv)
                if bdh <= 64
                else _c(8, 2, BM=64, BN=64, BV=64)
            )
            for dc in ("bf16", "fp16"):
                T[("attn_fwd", a, dc, bdh)] = (
                    _c(4, 3, BM=64, BN=64, BV=bv) if bdh <= 64 else _c(8, 2, BM=64, BN=64, BV=64)
                )
        # ---- attention JVP tangent pass: one tangent per program, p recomputed from the saved lse
        for bdh in (16, 32, 64, 128):
            bv = min(bdh, 64)
            T[("attn_jvp", a, "fp32", bdh)] = (
                _c(4, 2, BM=32, BN=32, BV=bv)
                if bdh == 16
                else _c(8, 2, BM=32, BN=32, BV=bv)
                if bdh == 32
                else _c(8, 2, BM=16, BN=32, BV=bv)
                if bdh == 64
                else _c(8, 2, BM=16, BN=32, BV=64, DSPLIT=2)
            )
            T[("attn_jvp", a, "fp64", bdh)] = (
                _c(4, 1, BM=32, BN=32, BV=min(bdh, 32))
                if bdh <= 64
                else _c(8, 1, BM=16, BN=32, BV=64, DSPLIT=1 if a == 90 else 2)
            )
            T[("attn_jvp", a, "tf32", bdh)] = (
                _c(4, 2, BM=64, BN=32, BV=bv) if bdh <= 64 else _c(8, 1, BM=32, BN=32, BV=64)
            )
            for dc in ("bf16", "fp16"):
                T[("attn_jvp", a, dc, bdh)] = (
                    _c(8 if (a == 80 and bdh == 64) else 4, 2, BM=64, BN=32, BV=bv)
                    if bdh <= 64
                    else _c(8, 1, BM=64, BN=32, BV=64)
                )
        # ---- fused residual + norm JVP: no loop, no dot; elems = BR * BG * BN per program
        for dc in ("fp32", "bf16", "fp16", "fp64"):
            T[("norm", a, dc, 1024)] = _c(4, 1, elems=2048 if dc != "fp64" else 1024)
            T[("norm", a, dc, 4096)] = _c(8, 1, elems=4096)
            if dc != "fp64":  # float64 rows of 8192 spill even at 32 warps: no verified entry, so they raise
                T[("norm", a, dc, 8192)] = _c(16, 1, elems=8192)
        # ---- dense step Jacobian: [BR, BM, BB] output tile, 2H FMAs per element (no matrix product)
        for dc in ("fp32", "bf16", "fp16", "fp64"):
            for bb in (16, 32, 64):
                T[("dense", a, dc, bb)] = _c(8, 1, BR=8, BM=16, BB=bb)
        # ---- CholeskyQR2: Gram, apply + Gram, apply (IEEE products: FFMA in float32, DMMA in float64)
        for dc in ("fp32", "fp64"):
            for bk in (16, 32, 64, 128):
                if dc == "fp32":
                    g, ga, ap = (
                        {16: 256, 32: 128, 64: 32, 128: 32}[bk],
                        {16: 256, 32: 128, 64: 32, 128: 16}[bk],
                        {16: 256, 32: 128, 64: 64, 128: 16}[bk],
                    )
                    T[("qr_gram", a, dc, bk)] = _c(8, 2, BLOCK_N=g)
                    T[("qr_gram_apply", a, dc, bk)] = _c(16 if bk == 128 else 8, 2, BLOCK_N=ga)  # w16: W [128, 128]
                    T[("qr_apply", a, dc, bk)] = _c(16 if bk == 128 else 8, 2, BLOCK_N=ap)
                else:
                    g = {16: 128, 32: 128, 64: 64, 128: 16}[bk]
                    T[("qr_gram", a, dc, bk)] = _c(8, 2, BLOCK_N=g)
                    T[("qr_gram_apply", a, dc, bk)] = _c(
                        8, 2 if bk < 128 else 1, BLOCK_N={16: 256, 32: 128, 64: 64, 128: 16}[bk]
                    )
                    T[("qr_apply", a, dc, bk)] = _c(8, 2, BLOCK_N={16: 256, 32: 128, 64: 64, 128: 32}[bk])


_fill()


def dtype_class(dtype: torch.dtype, precision: str = "ieee") -> str:
    """ "fp32" (IEEE float32), "tf32" (float32 operands on TF32 tensor cores), "bf16", "fp16" or "fp64"."""
    if dtype == torch.float32:
        return "tf32" if precision == "tf32" else "fp32"
    name = {torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if name is None:
        raise TypeError(f"no Triton launch configuration for dtype {dtype}")
    return name


def arch_of(device) -> Optional[int]:
    """The table's architecture for a CUDA device: 90 for compute capability 9.x, 80 for 8.x; None off CUDA.

    Only sm_80 and sm_90 are verified by the AOT check; other CUDA capabilities get the sm_80 entries (whose shared
    memory also has to fit there: sm_86 / sm_89 allow 101376 B per block, see docs/gpu.md)."""
    if ARCH_OVERRIDE is not None:
        return ARCH_OVERRIDE
    from ._utils import current_arch

    return current_arch(device)


def buckets(kernel: str):
    return sorted({k[3] for k in TABLE if k[0] == kernel})


def bucket_for(kernel: str, size: int) -> int:
    """The smallest bucket >= size; ValueError when size is beyond every verified bucket."""
    for b in buckets(kernel):
        if size <= b:
            return b
    raise ValueError(
        f"{kernel}: size {size} is beyond the verified launch table (largest bucket "
        f"{buckets(kernel)[-1]}); no unverified configuration is compiled: use backend='torch'"
    )


def config(kernel: str, arch: int, dclass: str, size: int) -> Tuple[int, LaunchConfig]:
    """(bucket, entry) for a kernel on an architecture, a dtype class and a problem size (see the module doc)."""
    b = bucket_for(kernel, size)
    key = (kernel, 80 if arch not in ARCHS else arch, dclass, b)
    if key not in TABLE:
        raise ValueError(f"{kernel}: no verified launch configuration for {dclass} (arch sm_{arch})")
    return b, TABLE[key]
