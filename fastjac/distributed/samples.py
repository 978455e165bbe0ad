"""Sample-parallel Benettin: rank r of P runs the contiguous samples [lo, hi) of the batch, gathers at the end.

The per-sample work is the single-process one (the model's own linearisation through ``fastjac.linearization``
with the backend resolved once per run, ``fastjac.ops.qr`` per sample); sample b draws its initial tangents with
``seed + b``, b its global index. The loop is the one engine (``fastjac.analysis.benettin``); its decisions (a
collapsed interval is redone, a non-finite state stops the run) are taken for the whole batch, as in a
single-process batched run, so the ranks agree on them with one all-reduce of a few numbers per
re-orthonormalisation. The results are gathered at the end (``all_gather_object`` of the shards' float64 sums,
histories and interval increments, so the gathered numbers are the shards' bytes).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..analysis.benettin import Parts, orthonormalize, radial_basis
from ..backends import select
from ..linearization import linearization
from . import _comm


def sample_parts(
    step, X: Tensor, C3: Optional[Tensor], group, *, k: int, backend: str, qr_backend: str, seed: int, store=None
):
    """(Parts, this rank's X shard, its generators) for the sample-parallel run of X [B, S, D]."""
    r, P = _comm.rank_and_size(group)
    B, S, D = X.shape
    lo, hi = _comm.shard_bounds(B, P, r)
    Xl = X[lo:hi]
    Cl = C3 if C3 is None or C3.dim() == 2 else C3[lo:hi]
    gens = [torch.Generator().manual_seed(seed + b) for b in range(lo, hi)]
    be = None
    if hi > lo:
        with torch.no_grad():
            be = select(step, Xl, backend)  # once per run

    def lin(Xs):
        return linearization(step, Xs, C=Cl, backend=be, check=False)

    def advance(Xs):
        with torch.no_grad():
            return lin(Xs).out

    def gather(sums, hist, incr):
        got = _comm.gather_objects((sums.cpu(), [h.cpu() for h in hist], [i.cpu() for i in incr]), group)
        cat = lambda i: [torch.cat([g[1 + i][j] for g in got]).to(X.device) for j in range(len(got[0][1 + i]))]  # noqa: E731
        return torch.cat([g[0] for g in got]).to(X.device), cat(0), cat(1)

    parts = Parts(
        linearize=lin,
        advance=advance,
        orthonormalize=lambda V: orthonormalize(V, qr_backend),
        draw=lambda gs: torch.stack([torch.randn(k, S, D, generator=g, dtype=torch.float64) for g in gs], 1),
        radial=lambda Xs: radial_basis(step, Xs),
        n=S * D,
        reduce=lambda t, op: _comm.all_reduce(t, op, group),
        gather=gather,
        active=hi > lo,
        store=store,
        check_each_step=False,
        save_on_interrupt=False,
    )
    return parts, Xl, gens
