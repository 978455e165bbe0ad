"""Argument helpers shared across the package (fastjac 0.3 removed the 0.2 spellings and their shims)."""

from __future__ import annotations

from typing import Optional, Union

import torch


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
