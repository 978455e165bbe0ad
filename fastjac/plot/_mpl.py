"""The matplotlib set-up shared by the plot modules: imported lazily, so fastjac imports without matplotlib."""

from __future__ import annotations

import sys
from typing import Optional


def _interactive() -> bool:
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules


def mpl():
    """matplotlib.pyplot, switched to the headless Agg backend unless a file backend or a session chose one."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig, ax, path: Optional[str]):
    """Save the figure to ``path`` (PNG) if given; return the Axes."""
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return ax
