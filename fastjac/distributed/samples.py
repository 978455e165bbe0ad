"""Sample-parallel Benettin: rank r of P runs the contiguous samples [lo, hi) of the batch, gathers at the end.

The per-sample work is the single-process one (the model's own linearisation through ``fastjac.linearization``,
``fastjac.ops.qr`` per sample); sample b draws its initial tangents with ``seed + b``, b its global index. No
collective runs per step: the ranks meet only at checkpoints and at the final gather (``all_gather_object`` of the
shards' float64 sums and histories, so the gathered numbers are the shards' bytes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..analysis.lyapunov import radial_basis
from ..linearization import linearization
from . import _comm
from .engine import benettin


def run_samples(step, X: Tensor, C3: Optional[Tensor], group, *, k: int, backend: str, qr_backend: str, seed: int,
                **loop):
    from . import _orthonormalize

    r, P = _comm.rank_and_size(group)
    B, S, D = X.shape
    lo, hi = _comm.shard_bounds(B, P, r)
    Xl = X[lo:hi]
    Cl = C3 if C3 is None or C3.dim() == 2 else C3[lo:hi]
    gens = [torch.Generator().manual_seed(seed + b) for b in range(lo, hi)]

    def linearize(Xs, forward_only=False):
        lin = linearization(step, Xs, C=Cl, backend=backend, check=False)
        if forward_only:
            with torch.no_grad():
                return lin.out
        return lin

    st = benettin(X=Xl, k=k, linearize=linearize, orthonormalize=lambda V: _orthonormalize(V, qr_backend),
                  draw_q0=lambda gs: torch.stack([torch.randn(k, S, D, generator=g, dtype=torch.float64)
                                                  for g in gs], 1),
                  radial=lambda Xs: radial_basis(step, Xs), gens=gens, active=hi > lo, **loop)
    local = (st["sums"].cpu(), [h.cpu() for h in st["hist"]], list(st["hist_steps"]))
    got = _comm.gather_objects(local, group)
    sums = torch.cat([g[0] for g in got]).to(X.device)
    hist = [torch.cat([g[1][i] for g in got]) for i in range(len(got[0][1]))]
    return sums, hist, got[0][2]
