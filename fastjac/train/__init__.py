"""Regularised training of recurrent self-attention (issue 10): regularisers, Sudoku models, the training loop.

    from fastjac.train import regularizers as R
    loss = ce + 1e-4 * R.spec(model) + 1e-2 * R.jacobian_frobenius(model.core, X, C=C, probes=4)

``python -m fastjac train --preset cpu`` trains a 4x4 Sudoku ItrSA in minutes on a CPU (docs/training.md).
Submodules are imported lazily so that ``import fastjac`` stays light.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("regularizers", "sudoku_models", "loop", "cli", "pretrained")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("train", "TrainConfig", "evaluate"):
        return getattr(importlib.import_module(f"{__name__}.loop"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES) + ["train", "TrainConfig", "evaluate"]
