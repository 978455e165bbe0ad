"""The Benettin/QR loop shared by the two parallel modes, and its per-rank checkpoints.

The loop is the one of ``fastjac.analysis.lyapunov.lyapunov_spectrum`` step for step (same order of operations,
same random draws, same history rule), with three pluggable pieces: how a state is linearised (the model's own
linearisation on a shard of samples, or the token-parallel one), how tangents are orthonormalised (``fj.ops.qr``
per sample, or the distributed CholeskyQR2) and how the initial tangents are drawn. So a sample-parallel shard
reproduces the single-process numbers of its samples, and a token-parallel run the single-process numbers of the
whole state (up to the rounding of the split sums).

Checkpoints (one file per rank). Every ``checkpoint_every`` steps each rank writes its own state atomically to
``<checkpoint>.rank<r>-of<P>.step<t>`` (tmp + os.replace), all ranks meet at a barrier, and only then does each rank
delete its files of earlier steps. A job killed at any moment therefore leaves, on every rank, the files of the last
step all ranks completed (plus perhaps one newer one on some ranks); a restarted job picks the latest step present
on every rank. Files are loaded with ``torch.load(weights_only=True)`` (tensors, numbers, lists, dicts, strings) and
must carry the run's fingerprint (``fastjac.analysis.lyapunov.fingerprint`` of the full inputs and the settings,
which include the mode and the world size). A checkpoint written under another world size is refused with a
ValueError naming ``checkpoint``: no re-sharding.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..analysis.lyapunov import project_off
from . import _comm

_NAME = re.compile(r"\.rank(\d+)-of(\d+)\.step(\d+)$")


class ShardCheckpoint:
    """Per-rank checkpoint files of one parallel run (see the module docstring)."""

    def __init__(self, base: str, group, fingerprint: str, mode: str, device):
        self.base, self.group, self.fp, self.mode, self.device = base, group, fingerprint, mode, device
        self.rank, self.world = _comm.rank_and_size(group)

    def path(self, t: int) -> str:
        return f"{self.base}.rank{self.rank}-of{self.world}.step{t:012d}"

    def _files(self):
        out = []
        for f in glob.glob(glob.escape(self.base) + ".rank*-of*.step*"):
            m = _NAME.search(f)
            if m and f[:m.start()] == self.base:
                out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), f))
        return out

    def find(self) -> Optional[int]:
        """The step to resume from (the latest one every rank has), or None for a fresh run. Collective."""
        files = self._files()
        other = max([w for _, w, _, _ in files if w != self.world], default=0)
        mine = sorted(t for r, w, t, _ in files if r == self.rank and w == self.world)[-4:]
        row = torch.tensor([other] + mine + [-1] * (4 - len(mine)), dtype=torch.int64)
        rows = _comm.all_gather_padded(row, [row.numel()] * self.world, self.group)
        others = [int(x[0]) for x in rows if int(x[0])]
        if others:
            raise ValueError(f"checkpoint: {self.base!r} has files written by a run with world size {others[0]}; "
                             f"this run has world size {self.world} and parallel checkpoints are not re-sharded: "
                             f"run with {others[0]} ranks, or delete {self.base}.rank* (or pass another path)")
        sets = [set(int(v) for v in x[1:] if int(v) >= 0) for x in rows]
        if not any(sets):
            return None
        common = set.intersection(*sets)
        if not common:
            raise ValueError(f"checkpoint: the ranks' files of {self.base!r} share no step (some are missing); "
                             f"delete {self.base}.rank* to start over")
        return max(common)

    def load(self, t: int) -> Dict[str, Any]:
        path = self.path(t)
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if saved.get("fingerprint") != self.fp:
            raise ValueError(f"checkpoint: {path!r} was written by a run with other inputs or settings; delete "
                             f"{self.base}.rank* or pass another path")
        if (saved.get("rank"), saved.get("world_size"), saved.get("mode")) != (self.rank, self.world, self.mode):
            raise ValueError(f"checkpoint: {path!r} belongs to rank {saved.get('rank')} of "
                             f"{saved.get('world_size')} ({saved.get('mode')!r}), not to this rank")
        return saved

    def save(self, t: int, state: Dict[str, Any]) -> None:
        """Write this rank's state for step t, wait for every rank, then drop this rank's older files."""
        path = self.path(t)
        tmp = path + ".tmp"
        torch.save(dict(state, fingerprint=self.fp, rank=self.rank, world_size=self.world, mode=self.mode), tmp)
        os.replace(tmp, path)
        _comm.barrier(self.group)
        for r, w, s, f in self._files():
            if r == self.rank and w == self.world and s < t:
                try:
                    os.remove(f)
                except FileNotFoundError:
                    pass


def clear_checkpoints(base: str, group) -> None:
    """Delete every rank's files of ``base`` (any world size): rank 0 deletes, then all ranks meet. Collective."""
    if _comm.rank_and_size(group)[0] == 0:
        for f in glob.glob(glob.escape(base) + ".rank*-of*.step*"):
            os.remove(f)
    _comm.barrier(group)


def benettin(*, X: Tensor, k: int, steps: int, burn_in: int, renorm_every: int, project_radial: bool,
             history_every: int, linearize: Callable, orthonormalize: Callable, draw_q0: Callable,
             radial: Callable, gens: List[torch.Generator], active: bool = True,
             ckpt: Optional[ShardCheckpoint] = None, checkpoint_every: int = 100, progress: bool = False) -> dict:
    """Run the iteration on this rank's data X [B, S_p, D]; returns the state dict (sums [B, k] float64, hist,
    hist_steps). ``active=False`` (a rank with no samples) computes nothing but still meets every checkpoint."""
    B = X.shape[0]
    st: Dict[str, Any] = dict(t=0, X=X, Q=None, sums=torch.zeros(B, k, dtype=torch.float64, device=X.device),
                              hist=[], hist_steps=[], renorms=0)
    if ckpt is not None:
        t0 = ckpt.find()
        if t0 is not None:
            saved = ckpt.load(t0)
            st = saved["state"]
            for g, r in zip(gens, saved["rng"]):
                g.set_state(r)

    def save():
        if ckpt is not None:
            ckpt.save(st["t"], dict(state=st, rng=[g.get_state() for g in gens]))

    from tqdm.auto import tqdm

    total = burn_in + steps
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    bar = tqdm(total=total, initial=st["t"], disable=not progress, desc="lyapunov", unit="step")
    try:
        while st["t"] < total:
            t = st["t"]
            if not active:
                pass
            elif t < burn_in:
                st["X"] = linearize(st["X"], forward_only=True)
            else:
                if st["Q"] is None:  # random orthonormal tangents at the first state after burn-in
                    Q0 = draw_q0(gens).to(X.dtype).to(X.device)
                    if project_radial:
                        Q0 = project_off(Q0, radial(st["X"]))
                    st["Q"] = orthonormalize(Q0)[0]
                lin = linearize(st["X"])
                V = lin.jvp(st["Q"])
                st["X"] = lin.out
                if project_radial:
                    V = project_off(V, radial(st["X"]))
                done = t + 1 - burn_in
                if done % renorm_every == 0 or done == steps:
                    st["Q"], logd = orthonormalize(V)
                    st["sums"] = st["sums"] + logd
                    st["renorms"] += 1
                    if st["renorms"] % history_every == 0 or done == steps:
                        st["hist"].append(st["sums"] / done)
                        st["hist_steps"].append(done)
                else:
                    st["Q"] = V
            if not active and t >= burn_in:  # keep the history bookkeeping of an empty shard in step
                done = t + 1 - burn_in
                if done % renorm_every == 0 or done == steps:
                    st["renorms"] += 1
                    if st["renorms"] % history_every == 0 or done == steps:
                        st["hist"].append(st["sums"].clone())
                        st["hist_steps"].append(done)
            st["t"] = t + 1
            bar.update(1)
            if ckpt is not None and st["t"] % checkpoint_every == 0 and st["t"] < total:
                save()
    finally:
        bar.close()
        torch.set_grad_enabled(grad_mode)
    save()
    return st


__all__ = ["ShardCheckpoint", "benettin", "clear_checkpoints"]
