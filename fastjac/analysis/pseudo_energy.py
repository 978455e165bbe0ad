"""Pseudo-energy monitor (docs/design.md section 3): one call unrolls a model and reports, per step t,

    E_pseudo(t) = −Tr(X_tᵀ (C + MSA(X_t)))
    lin(t)      = −½ x_tᵀ (J_t + J_tᵀ) x_t = −x_tᵀ J_t x_t,       J_t = ∂MSA/∂X at X_t, x_t = vec(X_t)
    cos(t)      = cos(vec MSA(X_t), J_t x_t)
    CI(t)       = Σ_{k ≤ K} (a_t^k)² / ‖x_t‖²,  a_t^k = u_kᵀ x_t in the eigenbasis of J_t + J_tᵀ sorted descending,
                  K = max(1, floor(top_frac · S·D))

and the "PV" approximation ``J_t ≈ Σ_h P_h ⊗ (Wv_h Wo_h)ᵀ`` (P_h the attention matrix; only the first term of
docs/design.md section 2's exact blocks, biases ignored), in three variants, each through the same quantities
(``lin_*``, ``cos_*``) and its relative error on the state direction ``‖(J_t − J_PV) x_t‖ / ‖J_t x_t‖``:

- ``pv``: P_h at the current state X_t. Without biases J_PV x_t = MSA(X_t) exactly, so lin_pv is the
  pseudo-energy without its C term and cos_pv = 1: the PV picture says E_pseudo *is* a quadratic form.
- ``pv_t0`` — **our reading of the paper's "PV (T=0)"**: P_h frozen at the initial state X_0 (the paper writes T
  for time, e.g. the horizon T = 16), i.e. one fixed linear operator for the whole trajectory; it measures how much
  of the dynamics a time-independent linearisation explains.
- ``pv_hard``: the zero-temperature reading (hard-max attention, P_h = one-hot argmax of each row at X_t),
  reported as well because docs/design.md does not fix the meaning.

J_t is never formed for large S·D: ``J_t x`` uses the analytic attention JVP, and CI uses the top K
eigenvectors of ``J_t + J_tᵀ`` from :func:`fastjac.linalg.eigsh` (Lanczos; dense ``torch.linalg.eigh`` when
S·D ≤ 2048 or ``method="dense"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from .. import linalg
from .._compat import make_generator
from ..linearization import linearization, prepare
from ..models import RecurrentStep
from .spectra import _op, _warn_unconverged

F64 = torch.float64
DENSE_EIGH_MAX_N = 2048
FIELDS = (
    "E_pseudo",
    "lin",
    "cos",
    "ci",
    "lin_pv",
    "cos_pv",
    "err_pv",
    "lin_pv_t0",
    "cos_pv_t0",
    "err_pv_t0",
    "lin_pv_hard",
    "cos_pv_hard",
    "err_pv_hard",
)


@dataclass
class PseudoEnergyTrace:
    """Per-step float64 arrays, shape [steps + 1] (X_0 first), or [steps + 1, B] for a batched X0.

    Fields: E_pseudo, lin, cos, ci (see the module docstring); for each PV variant v in (pv, pv_t0, pv_hard):
    lin_v, cos_v, err_v. ``top_k`` is the K of the contribution index; ``method`` "dense" or "lanczos".
    """

    E_pseudo: Tensor
    lin: Tensor
    cos: Tensor
    ci: Tensor
    lin_pv: Tensor
    cos_pv: Tensor
    err_pv: Tensor
    lin_pv_t0: Tensor
    cos_pv_t0: Tensor
    err_pv_t0: Tensor
    lin_pv_hard: Tensor
    cos_pv_hard: Tensor
    err_pv_hard: Tensor
    top_k: int = 0
    method: str = ""
    trajectory: Optional[Tensor] = field(default=None, repr=False)

    def to_dict(self) -> Dict[str, object]:
        d = {f: getattr(self, f).tolist() for f in FIELDS}
        d.update(top_k=self.top_k, method=self.method)
        return d


def _cos(a: Tensor, b: Tensor) -> float:
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def _wvo(model) -> Tensor:
    # [H, D, D]: Wv_h Wo_h (Wo_h = I without an output projection)
    return model.wv if model.wo is None else model.wv @ model.wo


def pv_apply(P: Tensor, wvo: Tensor, X: Tensor) -> Tensor:
    """The PV operator on a state: ``Σ_h P_h X Wv_h Wo_h``, i.e. ``(Σ_h P_h ⊗ (Wv_h Wo_h)ᵀ) vec(X)``.

    P [H, S, S] attention matrices; wvo [H, D, D]; X [..., S, D] -> [..., S, D].

    Example:
        >>> import torch
        >>> P = torch.softmax(torch.randn(2, 5, 5), -1)
        >>> pv_apply(P, torch.randn(2, 8, 8), torch.randn(5, 8)).shape
        torch.Size([5, 8])
    """
    return torch.einsum("hij,...jd,hde->...ie", P, X, wvo)


def _hard(A: Tensor) -> Tensor:
    return torch.zeros_like(A).scatter_(-1, A.argmax(-1, keepdim=True), 1.0)


def _top_k(top_frac, n: int) -> int:
    if not isinstance(top_frac, (int, float)) or isinstance(top_frac, bool) or not 0 < top_frac <= 1:
        raise ValueError(f"top_frac: expected a float in (0, 1], got {top_frac!r}")
    return max(1, int(math.floor(top_frac * n + 1e-9)))


def _ci(op, x: Tensor, K: int, dense: bool, tol, maxiter, generator) -> float:
    """Share of ‖x‖² in the top-K eigenvectors of J + Jᵀ (descending)."""
    if dense:
        Jd = op.dense().to(F64)
        _, U = torch.linalg.eigh(Jd + Jd.T)  # ascending
        a = U[:, -K:].T @ x
    else:
        sym = lambda V: op.matvec(V) + op.rmatvec(V)  # noqa: E731
        res = linalg.eigsh(
            sym,
            op.n,
            K,
            which="LA",
            vectors=True,
            dtype=op.dtype,
            device=op.device,
            tol=tol,
            maxiter=maxiter,
            seed=generator,
        )
        if not res.converged:
            _warn_unconverged("pseudo_energy_trace (contribution index)", res.cycles)
        a = res.vectors @ x
    return ((a**2).sum() / (x @ x)).item()


def _one_sample(model, traj: Tensor, C: Optional[Tensor], K: int, dense: bool, tol, maxiter, generator):
    wvo = _wvo(model).detach()
    A0 = None
    rows = []
    for Xt in traj:
        # one attention pass per state: its probabilities serve J_t, MSA(X_t) and the PV picture alike
        op = _op(linearization(model, Xt, part="msa", check=False))
        At = op.linearization.core.probs[0]
        A0 = At if A0 is None else A0
        x = Xt.reshape(-1).to(F64)
        msa = op.out.reshape(-1).to(F64)
        F = msa if C is None else msa + C.reshape(-1).to(F64)
        Jx = op.matvec(Xt.reshape(1, -1))[0].to(F64)
        r = {
            "E_pseudo": -(x @ F).item(),
            "lin": -(x @ Jx).item(),
            "cos": _cos(msa, Jx),
            "ci": _ci(op, x, K, dense, tol, maxiter, generator),
        }
        for name, P in (("pv", At), ("pv_t0", A0), ("pv_hard", _hard(At))):
            y = pv_apply(P, wvo, Xt).reshape(-1).to(F64)
            r[f"lin_{name}"] = -(x @ y).item()
            r[f"cos_{name}"] = _cos(msa, y)
            r[f"err_{name}"] = ((Jx - y).norm() / Jx.norm().clamp_min(1e-300)).item()
        rows.append(r)
    return {f: torch.tensor([r[f] for r in rows], dtype=F64) for f in FIELDS}


def pseudo_energy_trace(
    step,
    X0: Tensor,
    *,
    C: Optional[Tensor] = None,
    steps: int,
    top_frac: float = 0.02,
    method: str = "auto",
    tol: float = 1e-8,
    maxiter: int = 300,
    seed: Optional[Union[int, torch.Generator]] = None,
    keep_trajectory: bool = False,
) -> PseudoEnergyTrace:
    """Unroll ``model`` from X0 for ``steps`` steps and monitor the pseudo-energy along the way.

    Args:
        step: a fastjac attention model (ItrSA or AKOrN; J_t is ∂MSA/∂X of its attention).
        X0: initial state [S, D] or [B, S, D]. C: injected input (X0's shape, [S, D], or None).
        steps: number of steps (the arrays have steps + 1 entries, X_0 first).
        top_frac: the contribution index uses the top K = max(1, floor(top_frac·S·D)) eigenvectors (paper: 2%).
        method: "dense" (torch.linalg.eigh of J_t + J_tᵀ), "lanczos" (matrix-free top-K, :func:`fastjac.linalg.eigsh`)
            or "auto" (dense up to S·D = 2048).
        tol, maxiter, seed: for Lanczos (seed: an int or a torch.Generator). keep_trajectory: also return the states [steps + 1, *X0.shape].

    Returns:
        :class:`PseudoEnergyTrace` (``.to_dict()`` for JSON).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2).double()
        >>> tr = pseudo_energy_trace(m, torch.randn(9, 16, dtype=torch.float64), steps=5)
        >>> tr.E_pseudo.shape, tr.top_k, bool((tr.ci > 0).all() and (tr.ci <= 1).all())
        (torch.Size([6]), 2, True)
    """
    generator = make_generator(seed)
    model = step
    if not (isinstance(model, RecurrentStep) and callable(getattr(model, "msa_linearization", None))):
        raise TypeError(f"step: expected a fastjac attention model (ItrSA or AKOrN), got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps}")
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'lanczos', got {method!r}")
    X3, _, batched = prepare(model, X0, C, name="X0")
    n = X3.shape[1] * X3.shape[2]
    K = _top_k(top_frac, n)
    dense = method == "dense" or (method == "auto" and n <= DENSE_EIGH_MAX_N)
    with torch.no_grad():
        traj = model.unroll(X0, C, steps)  # [T+1, *X0.shape]
        if not batched:
            cols = _one_sample(model, traj, C, K, dense, tol, maxiter, generator)
        else:
            per = [
                _one_sample(
                    model,
                    traj[:, b],
                    None if C is None else (C if C.dim() == 2 else C[b]),
                    K,
                    dense,
                    tol,
                    maxiter,
                    generator,
                )
                for b in range(X3.shape[0])
            ]
            cols = {f: torch.stack([p[f] for p in per], dim=1) for f in FIELDS}
    return PseudoEnergyTrace(
        **cols, top_k=K, method="dense" if dense else "lanczos", trajectory=traj if keep_trajectory else None
    )


__all__ = ["PseudoEnergyTrace", "pseudo_energy_trace", "pv_apply"]
