"""The baselines every fastjac benchmark compares against, in one place: plain torch.func on the model's forward."""
from __future__ import annotations

import torch


def _f(model, C):
    return (lambda x: model(x)) if C is None else (lambda x: model(x, C))


def jacrev_dense(model, X, C=None, chunk_size=None):
    """Dense step Jacobian [S*D, S*D] of an unbatched X [S, D] by torch.func.jacrev."""
    n = X.numel()
    return torch.func.jacrev(_f(model, C), chunk_size=chunk_size)(X).reshape(n, n)


def vmap_jvp(model, X, T, C=None):
    """k JVPs [k, *X.shape] by torch.func.vmap over torch.func.jvp (one forward per tangent, batched by vmap)."""
    f = _f(model, C)
    return torch.func.vmap(lambda t: torch.func.jvp(f, (X,), (t,))[1])(T)
