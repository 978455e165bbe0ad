"""The trained model that ships with fastjac: a 4x4 Sudoku ItrSA, the default model of ``python -m fastjac``.

    model, X0, C = load_default()      # ItrSA core (float64), X0 [16, 32], C [16, 32] of a held-out puzzle
    DEFAULT_INFO["eval"], DEFAULT_INFO["lyapunov"]

Made by ``python examples/train_default_model.py`` (the CPU preset, seed 0); weights in
``fastjac/train/weights/`` (safetensors, loaded without unpickling).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
CORE_FILE = os.path.join(WEIGHTS, "itrsa_sudoku4.safetensors")
NET_FILE = os.path.join(WEIGHTS, "itrsa_sudoku4_net.safetensors")


def _info() -> Dict[str, Any]:
    if not os.path.isfile(CORE_FILE):
        return {"what": "missing: run python examples/train_default_model.py"}
    from safetensors import SafetensorError, safe_open

    try:  # read at import: a damaged file must not break ``import``; load_default then says what is wrong
        with safe_open(CORE_FILE, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        info = json.loads(meta.get("info", "{}"))
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        return {
            "what": f"unreadable: {CORE_FILE} ({type(e).__name__}); reinstall fastjac or run "
            f"python examples/train_default_model.py"
        }
    return info if isinstance(info, dict) else {"what": f"unreadable: {CORE_FILE} (info is not a JSON object)"}


#: what the shipped model is, how it was trained, its accuracy (ID/OOD at T = 16, 32, 64) and its exponents
DEFAULT_INFO: Dict[str, Any] = _info()


def load_net(dtype: torch.dtype = torch.float64):
    """The whole shipped Sudoku model (embedding, positions, ItrSA core, readout) as a SudokuNet."""
    from .loop import load_net as _load

    if not os.path.isfile(NET_FILE):
        raise FileNotFoundError(f"{NET_FILE} is missing; run python examples/train_default_model.py")
    return _load(NET_FILE, dtype=dtype)


def load_default() -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, X0, C): the trained ItrSA core in float64, and the initial state X0 [S, D] and injected input C
    [S, D] the Sudoku model feeds it for one held-out 4x4 puzzle (``DEFAULT_INFO["example_puzzle"]``).

    Example:
        >>> from fastjac.train.pretrained import load_default
        >>> model, X0, C = load_default()
        >>> tuple(X0.shape), model.dim
        ((16, 32), 32)
    """
    from ..models import load_model

    if not os.path.isfile(CORE_FILE):
        raise FileNotFoundError(f"{CORE_FILE} is missing; run python examples/train_default_model.py")
    model = load_model(CORE_FILE).double()
    net = load_net(torch.float64)
    if "example_puzzle" not in DEFAULT_INFO:
        raise ValueError(f"{CORE_FILE}: no example_puzzle in its metadata ({DEFAULT_INFO.get('what', 'damaged')})")
    puzzle = torch.tensor(DEFAULT_INFO["example_puzzle"], dtype=torch.int64).unsqueeze(0)
    with torch.no_grad():
        X0, C = net.inputs(puzzle)
    return model, X0[0].clone(), C[0].clone()


__all__ = ["load_default", "load_net", "DEFAULT_INFO", "CORE_FILE", "NET_FILE"]
