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


def k_single_tangent_jvps(jvp_fn, T):
    """k JVPs [k, *X.shape] as k separate one-tangent calls of the same linearisation (no shared softmax)."""
    return torch.stack([jvp_fn(T[t]) for t in range(T.shape[0])])


def write_output(out):
    """The floor of any dense-Jacobian method: writing every element of an output of the same size once."""
    return out.fill_(1.0)


def lyapunov_autograd(model, X0, C, k, steps, seed=0):
    """Benettin exponents [k] as users hand-roll them: vmap(jvp) for k tangents, torch.linalg.qr every step.

    X0 [S, D]. The initial tangents are drawn as fastjac.lyapunov_spectrum draws them (float64 randn with
    ``seed``), so both give the same exponents up to rounding.
    """
    S, D = X0.shape
    n = S * D
    g = torch.Generator().manual_seed(seed)
    T0 = torch.randn(k, S, D, generator=g, dtype=torch.float64).to(X0.dtype).to(X0.device)
    Q = torch.linalg.qr(T0.reshape(k, n).T)[0].T.reshape(k, S, D)
    f = _f(model, C)
    X, sums = X0, torch.zeros(k, dtype=torch.float64, device=X0.device)
    with torch.no_grad():
        for _ in range(steps):
            X_, V = torch.func.vmap(lambda t: torch.func.jvp(f, (X,), (t,)), out_dims=(None, 0))(Q)
            Qm, R = torch.linalg.qr(V.reshape(k, n).T)
            sums += R.diagonal().abs().double().log()
            Q, X = Qm.T.reshape(k, S, D), X_
    return (sums / steps).sort(descending=True).values
