"""Sudoku models of the paper's experiments: an input embedding plus learned positions give the injected input C,
a fastjac recurrent core (ItrSA or AKOrN) runs T steps from X0, and a linear readout maps the final state to digits.

    net = SudokuNet("itrsa", size=4, dim=64, heads=4)
    logits = net(puzzles, steps=16)            # puzzles int64 [B, size*size] (0 = blank) -> [B, size*size, size]
    X0, C = net.inputs(puzzles)                # what the core sees: [B, S, D] each

X0 is the injected input put on the state manifold: ``C / |C|`` per token for ItrSA (the l2 norm's sphere, scaled
by gamma), per oscillator for AKOrN. The loss is on the final step only (:func:`sudoku_loss`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..models import AKOrN, ItrSA

KINDS = ("itrsa", "akorn")


class SudokuNet(nn.Module):
    """Embedding + learned positions -> C [B, S, D]; ``steps`` recurrent steps of ``core``; readout -> logits.

    Args:
        kind: "itrsa" (``fj.ItrSA``, l2 norm: the paper's RMSNorm) or "akorn" (``fj.AKOrN``, oscillators of
            ``osc_dim`` features). size: board side (4 or 9). dim: D. heads: H. steps: default T (16).
        dtype: parameter dtype (float32 for training).

    Attributes: embed (nn.Embedding(size + 1, D)), pos [S, D], core (the fastjac model), readout (Linear(D, size)).
    """

    def __init__(
        self,
        kind: str = "itrsa",
        *,
        size: int = 4,
        dim: int = 64,
        heads: int = 4,
        steps: int = 16,
        osc_dim: int = 4,
        dtype: Optional[torch.dtype] = None,
        seed: int = 0,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if size not in (4, 6, 9):
            raise ValueError(f"size: expected 4, 6 or 9, got {size!r}")
        D, H = check_int("dim", dim), check_int("heads", heads)
        self.steps = check_int("steps", steps)
        self.kind, self.size = kind, size
        S = size * size
        dtype = dtype or torch.get_default_dtype()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == "itrsa":
                self.core = ItrSA(D, H, norm="l2", dtype=dtype)
            else:
                self.core = AKOrN(D, H, osc_dim=osc_dim, dtype=dtype)
            self.embed = nn.Embedding(size + 1, D, dtype=dtype)
            self.readout = nn.Linear(D, size, dtype=dtype)
        self.pos = nn.Parameter(torch.randn(S, D, generator=g, dtype=torch.float64).to(dtype))
        self._config = dict(kind=kind, size=size, dim=D, heads=H, steps=self.steps, osc_dim=osc_dim, seed=seed)

    def config(self) -> Dict[str, Any]:
        return dict(self._config)

    def inputs(self, puzzles: Tensor) -> Tuple[Tensor, Tensor]:
        """(X0, C) [B, S, D] for int64 puzzles [B, S]."""
        if (
            not isinstance(puzzles, Tensor)
            or puzzles.dtype not in (torch.int64, torch.int32)
            or puzzles.dim() != 2
            or puzzles.shape[1] != self.size**2
        ):
            raise ValueError(
                f"puzzles: expected an int64 tensor [B, {self.size**2}], got "
                f"{getattr(puzzles, 'dtype', type(puzzles).__name__)} {tuple(getattr(puzzles, 'shape', ()))}"
            )
        C = self.embed(puzzles.long()) + self.pos
        if self.kind == "akorn":
            X0 = self.core.project(C)
        else:
            X0 = C / C.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return X0, C

    def forward(self, puzzles: Tensor, steps: Optional[int] = None, return_states: bool = False):
        """Logits [B, S, size] after ``steps`` (default self.steps) steps; with ``return_states`` also the
        trajectory list [X0, ..., X_T] and C."""
        T = self.steps if steps is None else check_int("steps", steps)
        X, C = self.inputs(puzzles)
        xs = [X]
        for _ in range(T):
            X = self.core(X, C)
            xs.append(X)
        logits = self.readout(X)
        return (logits, xs, C) if return_states else logits


def sudoku_loss(logits: Tensor, solutions: Tensor) -> Tensor:
    """Cross-entropy over all cells: logits [B, S, size], solutions int64 [B, S] in 1..size."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), (solutions - 1).reshape(-1).long())


@torch.no_grad()
def accuracy(logits: Tensor, puzzles: Tensor, solutions: Tensor) -> Dict[str, float]:
    """board: fraction of boards whose blank cells are all right (givens are copied from the puzzle); cell: fraction
    of the blank cells right."""
    pred = logits.argmax(-1) + 1
    ok = pred == solutions
    blank = puzzles == 0
    return {
        "board": (ok | ~blank).all(-1).double().mean().item(),
        "cell": (ok & blank).sum().item() / max(1, blank.sum().item()),
    }


__all__ = ["SudokuNet", "sudoku_loss", "accuracy", "KINDS"]
