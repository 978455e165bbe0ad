"""Plots of Lyapunov results: the spectrum and the convergence of its running estimates (matplotlib, lazily).

Exponents are in nats per step (natural log of the growth factor per application of the step); steps are counted
after the burn-in.
"""

from __future__ import annotations

import math
from typing import Optional

UNITS = "nats per step"
# error bars and bands: this many standard errors (result.stderr, batch means) either side, about 95 %
SE_WIDTH = 2.0


def _stderr(result, sample: int):
    se = getattr(result, "stderr", None)
    if se is None or se.numel() == 0:
        return None
    se = se[sample] if result.batched else se
    return se if bool(torch_isfinite_any(se)) else None


def torch_isfinite_any(t) -> bool:
    import torch

    return bool(torch.isfinite(t).any())


def _steps_label(result) -> str:
    s = result.settings
    if s.get("method") == "benettin":
        return f"{result.steps} steps after {s.get('burn_in', 0)} burn-in"
    return f"horizon {result.steps}"


def settings_text(result) -> str:
    """One line of the settings that produced ``result`` (for a plot annotation)."""
    s = result.settings
    keys = (
        "method",
        "k",
        "steps",
        "burn_in",
        "renorm_every_used",
        "tol",
        "stopped_early",
        "horizon",
        "project_radial",
        "backend",
        "dtype",
        "seed",
        "step",
    )
    parts = [f"{k}={s[k]}" for k in keys if k in s]
    return ", ".join(parts)


def _fit_ylim(ax, values, pad: float = 0.08) -> None:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = hi - lo if hi > lo else max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad * span, hi + pad * span)


from ._mpl import finish  # noqa: E402 (after the helpers above; matplotlib itself loads lazily)
from ._mpl import mpl as _mpl  # noqa: E402


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
    se = _stderr(result, sample)
    if se is not None:
        errs = [se.tolist()[i - 1] for i, _ in fin]
        errs = [SE_WIDTH * v if math.isfinite(v) else 0.0 for v in errs]
        ax.errorbar(
            [i for i, _ in fin],
            [e for _, e in fin],
            yerr=errs,
            fmt="o-",
            ms=3,
            capsize=2,
            elinewidth=0.8,
            label=f"exponents, +-{SE_WIDTH:g} std. errors",
        )
    else:
        ax.plot([i for i, _ in fin], [e for _, e in fin], "o-", ms=3, label="exponents")
    triv = [i for i, t in zip(idx, tv.tolist()) if t]
    if triv and fin:
        low = min(e for _, e in fin)
        ax.plot(
            triv,
            [low - 0.1 * (abs(low) + 1)] * len(triv),
            "v",
            color="gray",
            ms=4,
            label=f"trivial (-inf): {len(triv)}",
        )
    shown = [e for _, e in fin] + ([low - 0.1 * (abs(low) + 1)] if triv and fin else [])
    if shown and min(shown) <= 0 <= max(shown) * 1.5 + 0.1:
        ax.axhline(0.0, color="k", lw=0.6)
    _fit_ylim(ax, shown)
    ax.set_xlabel("index i (descending)")
    ax.set_ylabel(rf"$\lambda_i$ ({UNITS})")
    ax.set_title(f"Lyapunov spectrum: {len(ex)} exponents, {_steps_label(result)}", fontsize=9)
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
    k = h.shape[-1]
    triv = result.trivial.reshape(-1, k)[sample if result.batched else 0]
    shown, late = [], []
    start = max(1, steps[-1] // 10) if steps else 1  # the y range follows the last 90% of the run, not the start
    se = _stderr(result, sample)
    for i in range(min(top, k)):
        if not bool(triv[i]):
            col = h[:, i].tolist()
            (line,) = ax.plot(steps, col, lw=1, label=rf"$\lambda_{{{i + 1}}}$")
            if se is not None and math.isfinite(float(se[i])) and steps:
                # the final estimate's band: where the running estimate is expected to settle
                e, w = col[-1], SE_WIDTH * float(se[i])
                ax.axhspan(e - w, e + w, xmin=0.8, xmax=1.0, color=line.get_color(), alpha=0.2, lw=0)
            shown.append(i)
            late += [v for s_, v in zip(steps, col) if s_ >= start]
    n_real = int((~triv).sum())
    if late and min(late) <= 0 <= max(late):
        ax.axhline(0.0, color="k", lw=0.6)
    _fit_ylim(ax, late)
    ax.set_xscale("log")
    ax.set_xlabel(f"steps after the {result.settings.get('burn_in', 0)} burn-in steps")
    ax.set_ylabel(f"running estimate ({UNITS})")
    band = f"; bands: final +-{SE_WIDTH:g} std. errors" if se is not None else ""
    ax.set_title(f"convergence: the {len(shown)} largest of {n_real} non-trivial exponents{band}", fontsize=9)
    if shown:
        ax.legend(fontsize=7, ncol=2)
    return finish(ax.figure, ax, path)


def plot_lyapunov(result, path: str, sample: int = 0, top: int = 8):
    """Spectrum and convergence side by side, with the run's settings underneath, saved to ``path`` (PNG).
    Returns the figure.

    Example:
        >>> import torch, fastjac as fj, tempfile, os
        >>> from fastjac.plot.lyapunov import plot_lyapunov
        >>> res = fj.lyapunov_spectrum(fj.ItrSA(8, 2), torch.randn(5, 8), k=6, steps=20, progress=False)
        >>> fig = plot_lyapunov(res, os.path.join(tempfile.mkdtemp(), "l.png"))
    """
    plt = _mpl()
    has_hist = result.history.numel() > 0
    fig, axes = plt.subplots(1, 2 if has_hist else 1, figsize=(10 if has_hist else 5, 4.2), squeeze=False)
    plot_spectrum(result, ax=axes[0, 0], sample=sample)
    if has_hist:
        plot_convergence(result, ax=axes[0, 1], top=top, sample=sample)
    mx, mu = result.max, result.mean
    mx = float(mx[sample] if mx.dim() else mx)
    mu = float(mu[sample] if mu.dim() else mu)
    mse = getattr(result, "max_stderr", None)
    mse = float(mse[sample] if mse is not None and mse.dim() else mse) if mse is not None else float("nan")
    import textwrap

    pm = f" +- {mse:.4f} (std. error)" if math.isfinite(mse) else ""
    note = textwrap.fill(
        f"max {mx:+.4f}{pm}, mean {mu:+.4f} {UNITS}  |  {settings_text(result)}", width=150 if has_hist else 75
    )
    fig.text(0.01, 0.01, note, fontsize=7, color="0.3", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * note.count("\n") + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
