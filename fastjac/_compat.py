"""Old spellings of public arguments, kept working for one release with a DeprecationWarning."""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Union

import torch


def renamed_kwargs(**old_to_new: str):
    """Decorator: ``@renamed_kwargs(T="horizon")`` accepts ``T=`` as ``horizon=`` with a DeprecationWarning."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}: got both {old}= (deprecated) and {new}=; pass only {new}=")
                    warnings.warn(f"{fn.__name__}: the argument {old}= is deprecated and will be removed in "
                                  f"fastjac 0.3; use {new}=", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return wrapper
    return deco


def make_generator(seed: Optional[Union[int, torch.Generator]], name: str = "seed") -> Optional[torch.Generator]:
    """The one randomness argument of fastjac: an int seed, a torch.Generator, or None (a fresh default-seeded
    generator is NOT made: None means torch's global RNG)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int or a torch.Generator, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {seed}")
    return torch.Generator().manual_seed(seed)
