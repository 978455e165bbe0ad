"""Plots of Lyapunov results: the spectrum and the convergence of its running estimates (matplotlib, lazily)."""
from __future__ import annotations

from typing import Optional

from ._mpl import finish
from ._mpl import mpl as _mpl


def plot_spectrum(result, ax=None, path: Optional[str] = None, sample: int = 0):
    """Exponents against their index, trivial (-inf) ones marked at the bottom; the zero line for reference.

    Example:
        >>> import torch, fastjac as fj
        >>> from fastjac.plot.lyapunov import plot_spectrum
        >>> res = fj.lyapunov_spectrum(fj.ItrSA(8, 2), torch.randn(5, 8), k=6, steps=20, progress=False)
        >>> ax = plot_spectrum(res)
    """
    plt = _mpl()
    ex = result.exponents[sample] if result.batched else result.exponents
    tv = result.trivial[sample] if result.batched else result.trivial
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    idx = range(1, len(ex) + 1)
    fin = [(i, e) for i, e, t in zip(idx, ex.tolist(), tv.tolist()) if not t]
    ax.plot([i for i, _ in fin], [e for _, e in fin], "o-", ms=3, label="exponents")
    triv = [i for i, t in zip(idx, tv.tolist()) if t]
    if triv and fin:
        low = min(e for _, e in fin)
        ax.plot(triv, [low - 0.1 * (abs(low) + 1)] * len(triv), "v", color="gray", ms=4,
                label=f"trivial (-inf): {len(triv)}")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("index i")
    ax.set_ylabel(r"$\lambda_i$")
    ax.set_title(f"Lyapunov spectrum ({result.settings.get('method', '')}, {result.steps} steps)")
    ax.legend(fontsize=8)
    return finish(ax.figure, ax, path)


def plot_convergence(result, ax=None, path: Optional[str] = None, top: int = 8, sample: int = 0):
    """Running estimates of the ``top`` largest exponents against the number of steps.

    Example:
        >>> import torch, fastjac as fj
        >>> from fastjac.plot.lyapunov import plot_convergence
        >>> res = fj.lyapunov_spectrum(fj.ItrSA(8, 2), torch.randn(5, 8), k=6, steps=20, progress=False)
        >>> ax = plot_convergence(res, top=3)
    """
    plt = _mpl()
    if result.history.numel() == 0:
        raise ValueError("result: has no history (finite-horizon results have none); use lyapunov_spectrum")
    h = result.history[:, sample] if result.batched else result.history
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    steps = result.history_steps.tolist()
    for i in range(min(top, h.shape[-1])):
        if not bool(result.trivial.reshape(-1, h.shape[-1])[sample if result.batched else 0, i]):
            ax.plot(steps, h[:, i].tolist(), lw=1, label=rf"$\lambda_{{{i + 1}}}$")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel("running estimate")
    ax.set_title("convergence")
    ax.legend(fontsize=7, ncol=2)
    return finish(ax.figure, ax, path)


def plot_lyapunov(result, path: str, sample: int = 0, top: int = 8):
    """Spectrum and convergence side by side, saved to ``path`` (PNG). Returns the figure."""
    plt = _mpl()
    has_hist = result.history.numel() > 0
    fig, axes = plt.subplots(1, 2 if has_hist else 1, figsize=(10 if has_hist else 5, 3.8), squeeze=False)
    plot_spectrum(result, ax=axes[0, 0], sample=sample)
    if has_hist:
        plot_convergence(result, ax=axes[0, 1], top=top, sample=sample)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
