"""Input validation shared by the public functions. Every error names the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import config


def check_int(name: str, v, minimum: int = 1) -> int:
    """An int (not a bool) >= minimum, or a TypeError/ValueError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def check_tensor(name: str, x, *, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match the state/model dtype {dtype}; convert one of them")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name}: device {x.device} does not match the state/model device {device}; move one of them")
    if config.check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or inf (fastjac.config.check_finite=True)")
    return x


def check_state(X, model_dim: Optional[int] = None, name: str = "X") -> Tuple[Tensor, bool]:
    """X must be [S, D] or [B, S, D]. Returns (X as [B, S, D], whether it was batched)."""
    check_tensor(name, X)
    if X.dim() not in (2, 3):
        raise ValueError(f"{name}: expected shape [S, D] or [B, S, D], got {tuple(X.shape)}")
    if X.shape[-2] < 1 or X.shape[-1] < 1 or (X.dim() == 3 and X.shape[0] < 1):
        raise ValueError(f"{name}: empty state of shape {tuple(X.shape)}")
    if model_dim is not None and X.shape[-1] != model_dim:
        raise ValueError(f"{name}: last dimension {X.shape[-1]} does not match the model's dim={model_dim}")
    return (X if X.dim() == 3 else X.unsqueeze(0)), X.dim() == 3


def check_input(C, X: Tensor, name: str = "C") -> Optional[Tensor]:
    """C (the injected input) is None, or X's shape, or [S, D] shared by a batch."""
    if C is None:
        return None
    check_tensor(name, C, dtype=X.dtype, device=X.device)
    if C.shape != X.shape and not (X.dim() == 3 and C.shape == X.shape[1:]):
        raise ValueError(f"{name}: expected shape {tuple(X.shape)} (or [S, D] for a batch), got {tuple(C.shape)}")
    return C


def check_tangent(name: str, T, X: Tensor) -> Tuple[Tensor, bool]:
    """T has X's shape or (k,) + X's shape. Returns (T with a leading k dim, whether k was given)."""
    check_tensor(name, T, dtype=X.dtype, device=X.device)
    if T.shape == X.shape:
        return T.unsqueeze(0), False
    if T.dim() == X.dim() + 1 and T.shape[1:] == X.shape:
        return T, True
    raise ValueError(
        f"{name}: expected shape {tuple(X.shape)} or (k,) + {tuple(X.shape)} for k tangents, got {tuple(T.shape)}")


def check_dense_size(S: int, D: int, B: int, dtype: torch.dtype, max_gb: Optional[float]) -> None:
    limit = config.dense_limit_gb if max_gb is None else max_gb
    n = S * D
    gb = B * n * n * torch.empty((), dtype=dtype).element_size() / 1e9
    if gb > limit:
        raise ValueError(
            f"X: the dense Jacobian would be {B} x [{n}, {n}] {dtype} = {gb:.2f} GB, over the limit of {limit:g} GB "
            f"(fastjac.config.set_dense_limit_gb or max_gb=). For large S*D use fastjac.jvp / fastjac.linearize "
            f"(k tangents at once) or fastjac.vjp instead of a dense matrix.")
