"""Plots of Jacobian spectra: eigenvalues in the complex plane, spectral norm against sequence length.

matplotlib is imported inside the functions (``Agg`` backend when none is chosen), so fastjac imports without it.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ._mpl import finish as _finish
from ._mpl import mpl as _mpl


def plot_eigenvalues(eigs: Dict[str, object], *, ax=None, path: Optional[str] = None, title: Optional[str] = None):
    """Eigenvalues in the complex plane with the unit circle.

    Args:
        eigs: label -> complex eigenvalues (tensor or array, any shape; flattened), one colour per label.
        ax: a matplotlib Axes to draw on (default: a new figure). path: save a PNG there. title: axes title.

    Returns:
        the Axes.

    Example:
        >>> import torch
        >>> ax = plot_eigenvalues({"J": torch.randn(20, dtype=torch.complex128)})
    """
    plt = _mpl()
    if not isinstance(eigs, dict) or not eigs:
        raise TypeError("eigs: expected a non-empty dict label -> complex eigenvalues")
    fig, ax = plt.subplots(figsize=(4.5, 4.5)) if ax is None else (ax.figure, ax)
    t = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(t), np.sin(t), "k--", lw=0.8, label="unit circle")
    for label, lam in eigs.items():
        z = np.asarray(lam.detach().cpu() if hasattr(lam, "detach") else lam).astype(complex).ravel()
        ax.scatter(z.real, z.imag, s=10, alpha=0.7, label=str(label))
    ax.axhline(0, color="0.8", lw=0.5)
    ax.axvline(0, color="0.8", lw=0.5)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return _finish(fig, ax, path)


def plot_norm_vs_length(
    lengths: Sequence[int],
    norms: Dict[str, Sequence[float]],
    *,
    ax=None,
    path: Optional[str] = None,
    title: Optional[str] = None,
    logy: bool = True,
):
    """Spectral norm of the Jacobian against the number of tokens, one line per label (e.g. with/without norm).

    Args:
        lengths: [L] sequence lengths. norms: label -> [L] spectral norms. ax, path, title as
        :func:`plot_eigenvalues`. logy: log scale on the norm axis.

    Example:
        >>> ax = plot_norm_vs_length([8, 16], {"none": [3.0, 5.0], "l2": [0.1, 0.1]})
    """
    plt = _mpl()
    if not isinstance(norms, dict) or not norms:
        raise TypeError("norms: expected a non-empty dict label -> list of norms")
    L = np.asarray(list(lengths), dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5)) if ax is None else (ax.figure, ax)
    for label, v in norms.items():
        v = np.asarray(list(v), dtype=float)
        if v.shape != L.shape:
            raise ValueError(f"norms: {label!r} has {v.size} values for {L.size} lengths")
        ax.plot(L, v, "o-", label=str(label))
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("number of tokens S")
    ax.set_ylabel("‖J‖₂")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _finish(fig, ax, path)


__all__ = ["plot_eigenvalues", "plot_norm_vs_length"]
