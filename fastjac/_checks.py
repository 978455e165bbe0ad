"""Input validation shared by the public functions. Every error names the argument and what was expected."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from . import config


class NonFiniteError(ValueError, FloatingPointError):
    """A computation left the floating-point range (inf/NaN appeared from finite inputs): an overflowing state,
    a diverging trajectory. A ValueError (and a FloatingPointError), so ``except ValueError`` catches it."""


def check_number(name: str, v, *, positive: bool = False, minimum: Optional[float] = None) -> float:
    """A real, finite number (not a bool, not a string), optionally > 0 or >= minimum; returns it as a float."""
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{name}: expected a positive number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum:g}, got {v!r}")
    return v


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity), tuples as lists,
    tensors as lists; what ``json.dump(..., allow_nan=False)`` then writes is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy scalars (np.int64, np.bool_, ...)
        return json_safe(obj.item())
    return str(obj)


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
    if x.device.type == "meta":
        raise ValueError(f"{name}: is a 'meta' tensor (a shape without values); fastjac needs real data on a device")
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
        f"{name}: expected shape {tuple(X.shape)} or (k,) + {tuple(X.shape)} for k tangents, got {tuple(T.shape)}"
    )


def check_dense_size(S: int, D: int, B: int, dtype: torch.dtype, max_gb: Optional[float]) -> None:
    if max_gb is None:  # the process-wide limit (validated when set; checked again: it is a plain attribute)
        limit = check_number("fastjac.config.dense_limit_gb", config.dense_limit_gb, positive=True)
    else:
        limit = check_number("max_gb", max_gb, positive=True)
    n = S * D
    gb = B * n * n * torch.empty((), dtype=dtype).element_size() / 1e9
    if gb > limit:
        raise ValueError(
            f"X: the dense Jacobian would be {B} x [{n}, {n}] {dtype} = {gb:.2f} GB, over the limit of {limit:g} GB "
            f"(fastjac.config.set_dense_limit_gb or max_gb=). For large S*D use fastjac.jvp / fastjac.linearize "
            f"(k tangents at once) or fastjac.vjp instead of a dense matrix."
        )
