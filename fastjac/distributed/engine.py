"""Per-rank checkpoints of the parallel Lyapunov runs (the loop itself is the one engine,
``fastjac.analysis.benettin.run_benettin``, which the single-process run uses too).

Checkpoints (one file per rank). Every ``checkpoint_every`` steps each rank writes its own state atomically to
``<checkpoint>.rank<r>-of<P>.step<t>`` (tmp + os.replace), all ranks meet at a barrier, and only then does each rank
delete its files of earlier steps. A job killed at any moment therefore leaves, on every rank, the files of the last
step all ranks completed (plus perhaps one newer one on some ranks); a restarted job picks the latest step present
on every rank. Files are loaded with ``torch.load(weights_only=True)`` (tensors, numbers, lists, dicts, strings) and
must carry the run's fingerprint (``fastjac._io.fingerprint`` of the full inputs and the settings,
which include the mode and the world size). A checkpoint written under another world size is refused with a
ValueError naming ``checkpoint``: no re-sharding.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, Optional

import torch

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
            if m and f[: m.start()] == self.base:
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
            raise ValueError(
                f"checkpoint: {self.base!r} has files written by a run with world size {others[0]}; "
                f"this run has world size {self.world} and parallel checkpoints are not re-sharded: "
                f"run with {others[0]} ranks, or delete {self.base}.rank* (or pass another path)"
            )
        sets = [set(int(v) for v in x[1:] if int(v) >= 0) for x in rows]
        if not any(sets):
            return None
        common = set.intersection(*sets)
        if not common:
            raise ValueError(
                f"checkpoint: the ranks' files of {self.base!r} share no step (some are missing); "
                f"delete {self.base}.rank* to start over"
            )
        return max(common)

    def load(self, t: int) -> Dict[str, Any]:
        path = self.path(t)
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if saved.get("fingerprint") != self.fp:
            raise ValueError(
                f"checkpoint: {path!r} was written by a run with other inputs or settings; delete "
                f"{self.base}.rank* or pass another path"
            )
        if (saved.get("rank"), saved.get("world_size"), saved.get("mode")) != (self.rank, self.world, self.mode):
            raise ValueError(
                f"checkpoint: {path!r} belongs to rank {saved.get('rank')} of "
                f"{saved.get('world_size')} ({saved.get('mode')!r}), not to this rank"
            )
        return saved

    def save(self, t: int, state: Dict[str, Any]) -> bool:
        """Write this rank's state for step t, wait for every rank, then drop this rank's older files. Collective.
        A write that fails (full disk) is reported by the return value (False), never raised: every rank still
        meets the barrier, and the older files are kept."""
        path = self.path(t)
        # the temporary file's name matches no rank's pattern, so a half-written file is never taken for a step
        tmp = f"{self.base}.partial-rank{self.rank}-of{self.world}.step{t:012d}"
        ok = True
        try:
            with open(tmp, "wb") as f:  # a Python file: a full disk is an OSError (torch's own writer: RuntimeError)
                torch.save(dict(state, fingerprint=self.fp, rank=self.rank, world_size=self.world, mode=self.mode), f)
            os.replace(tmp, path)
        except OSError as e:
            ok, self.error = False, e
            try:
                os.remove(tmp)
            except OSError:
                pass
        _comm.barrier(self.group)
        if ok:
            for r, w, s, f in self._files():
                if r == self.rank and w == self.world and s < t:
                    try:
                        os.remove(f)
                    except FileNotFoundError:
                        pass
        return ok


def clear_checkpoints(base: str, group) -> None:
    """Delete every rank's files of ``base`` (any world size): rank 0 deletes, then all ranks meet. Collective."""
    if _comm.rank_and_size(group)[0] == 0:
        for f in glob.glob(glob.escape(base) + ".rank*-of*.step*"):
            os.remove(f)
    _comm.barrier(group)


class ShardStore:
    """The engine's checkpoint store (``fastjac.analysis.benettin.Parts.store``) over per-rank files."""

    def __init__(self, ckpt: ShardCheckpoint):
        self.ckpt, self.failed = ckpt, False

    def load(self):
        t0 = self.ckpt.find()
        if t0 is None:  # a fresh run: every rank proves its files writable before any compute
            from .._io import check_writable

            err = None
            try:
                check_writable(self.ckpt.path(0))
            except ValueError as e:
                err = e
            bad = _comm.all_reduce(torch.tensor([0.0 if err is None else 1.0]), "max", self.ckpt.group)
            if float(bad[0]) > 0:
                raise (
                    err
                    if err is not None
                    else ValueError(
                        f"checkpoint: {self.ckpt.base!r} cannot be written on another rank (see its message)"
                    )
                )
            return None
        saved = self.ckpt.load(t0)
        return saved["state"], saved["rng"]

    def save(self, state, rng, final: bool = False) -> None:
        import warnings

        if not self.ckpt.save(state["t"], dict(state=state, rng=rng)) and not self.failed:
            self.failed = True  # warn once; the run (and the result) goes on
            warnings.warn(
                f"lyapunov_spectrum: rank {self.ckpt.rank} could not write its checkpoint "
                f"{self.ckpt.path(state['t'])!r} ({self.ckpt.error}); the run goes on without it",
                RuntimeWarning,
                stacklevel=4,
            )


__all__ = ["ShardCheckpoint", "ShardStore", "clear_checkpoints"]
