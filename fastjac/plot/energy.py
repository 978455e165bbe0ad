"""Plots of energies along trajectories: the pseudo-energy monitor and the energy-based flows.

matplotlib is imported inside the functions (``Agg`` backend when none is chosen), so fastjac imports without it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._mpl import finish as _finish
from ._mpl import mpl as _mpl


def _np(x):
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=float)


def plot_pseudo_energy(trace, *, ax=None, path: Optional[str] = None, title: Optional[str] = None, pv: bool = True):
    """Pseudo-energy, its linearisation (and the PV ones) on the left axis, contribution index on the right.

    Args:
        trace: a :class:`fastjac.analysis.pseudo_energy.PseudoEnergyTrace` (unbatched, or the first sample is drawn).
        ax: Axes (default: a new figure). path: save a PNG there. pv: also draw lin_pv and lin_pv_t0.

    Returns:
        (ax, ax_ci): the two Axes.

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.analysis.pseudo_energy import pseudo_energy_trace
        >>> tr = pseudo_energy_trace(fj.ItrSA(8, 2), torch.randn(5, 8), steps=3)
        >>> ax, ax2 = plot_pseudo_energy(tr)
    """
    plt = _mpl()
    if not hasattr(trace, "E_pseudo") or not hasattr(trace, "ci"):
        raise TypeError(f"trace: expected a PseudoEnergyTrace, got {type(trace).__name__}")
    pick = lambda v: _np(v)[:, 0] if _np(v).ndim == 2 else _np(v)  # noqa: E731
    t = np.arange(pick(trace.E_pseudo).size)
    fig, ax = plt.subplots(figsize=(6, 3.8)) if ax is None else (ax.figure, ax)
    ax.plot(t, pick(trace.E_pseudo), "-", color="C0", label="E_pseudo = −Tr Xᵀ(C+MSA)")
    ax.plot(t, pick(trace.lin), "--", color="C1", label="−½ xᵀ(J+Jᵀ)x")
    if pv:
        ax.plot(t, pick(trace.lin_pv), ":", color="C2", label="PV (P at t)")
        ax.plot(t, pick(trace.lin_pv_t0), "-.", color="C4", label="PV (T=0: P at t=0)")
    ax.set_xlabel("step t")
    ax.set_ylabel("energy")
    ax2 = ax.twinx()
    ax2.plot(t, pick(trace.ci), "s-", color="C3", ms=3, label=f"CI (top {trace.top_k})")
    ax2.set_ylabel("contribution index", color="C3")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    if title:
        ax.set_title(title)
    _finish(fig, ax, path)
    return ax, ax2


def plot_energy_flow(results: dict, *, ax=None, path: Optional[str] = None, title: Optional[str] = None):
    """Energy against time for flows from :func:`fastjac.analysis.energy.integrate_flow`, one line per label.

    Example:
        >>> import torch
        >>> from fastjac.analysis.energy import integrate_flow, symmetric_single_head
        >>> r = integrate_flow(symmetric_single_head(4), torch.randn(3, 4, dtype=torch.float64), steps=5)
        >>> ax = plot_energy_flow({"Prop 4.1": r})
    """
    plt = _mpl()
    if not isinstance(results, dict) or not results:
        raise TypeError("results: expected a non-empty dict label -> FlowResult")
    fig, ax = plt.subplots(figsize=(5, 3.5)) if ax is None else (ax.figure, ax)
    for label, r in results.items():
        e = _np(r.energy)
        ax.plot(_np(r.times), e - e[0], label=f"{label} (max rise {r.max_increase:.2g})")
    ax.set_xlabel("time")
    ax.set_ylabel("E(t) − E(0)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _finish(fig, ax, path)


__all__ = ["plot_energy_flow", "plot_pseudo_energy"]
