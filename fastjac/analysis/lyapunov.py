"""Lyapunov exponents of a recurrent step (DESIGN section 3): Benettin/QR over long trajectories, and the paper's
finite-horizon exponents.

    res = fj.lyapunov_spectrum(model, X0, C=C, k=32, steps=1000, burn_in=100)
    res.exponents, res.max, res.mean, res.history        # descending float64; running estimates for plots

Trivial exponents. A normalisation maps each group's radial direction (and, for LayerNorm, the constant direction
too) to zero, so ``S*D/N`` (LayerNorm: ``2*S*D/N``) exponents of a normalised step are -inf (with ``eps > 0`` the
radial direction survives with a factor of about eps/|z|^2 per step: not dynamics either). They are reported as
-inf with a ``trivial`` mask and never enter ``mean``. ``project_radial=True`` instead keeps the tangents on the
tangent space of the normalised states, so the k tangents explore only non-trivial directions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from .._checks import check_dense_size
from .._checks import check_int as _check_int
from .._compat import renamed_kwargs
from ..linearization import linearization, prepare
from ..models import RecurrentStep
from ..ops.qr import qr

# Largest S*D for which k=None means "all S*D tangents"; above it a k must be given.
FULL_K_LIMIT = 4096


@dataclass
class LyapunovResult:
    """Lyapunov exponents of one trajectory per sample.

    Attributes:
        exponents: [k] (or [B, k] for a batched X0), float64, descending; -inf where ``trivial``.
        trivial: bool, exponents' shape: directions killed by normalisation (or below ``trivial_below``).
        history: [R, k] (or [R, B, k]) running estimates at the steps in ``history_steps`` [R] (columns in the
            order of ``exponents``); empty for finite-horizon results.
        steps: number of Jacobians in the product (after burn-in). settings: how it was computed.
    """

    exponents: Tensor
    trivial: Tensor
    history: Tensor
    history_steps: Tensor
    steps: int
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        return self.exponents.dim() == 2

    def _reduce(self, fn) -> Tensor:
        ex = self.exponents if self.batched else self.exponents.unsqueeze(0)
        tv = self.trivial if self.batched else self.trivial.unsqueeze(0)
        vals = torch.stack([fn(e[~t]) if bool((~t).any()) else e.new_tensor(float("nan")) for e, t in zip(ex, tv)])
        return vals if self.batched else vals[0]

    @property
    def max(self) -> Tensor:
        """The largest non-trivial exponent: a float64 tensor, 0-dim (or [B] for a batched X0)."""
        return self._reduce(lambda e: e.max())

    @property
    def mean(self) -> Tensor:
        """The mean of the non-trivial exponents (0-dim, or [B]); trivial -inf never enters it."""
        return self._reduce(lambda e: e.mean())

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: -inf exponents are written as null (JSON has no infinity) with the ``trivial`` mask."""
        def clean(t: Tensor):
            return [None if not math.isfinite(v) else v for v in t.tolist()] if t.dim() == 1 else \
                [clean(r) for r in t]
        m, mu = self.max, self.mean
        return {
            "exponents": clean(self.exponents), "trivial": self.trivial.tolist(),
            "max": _json_num(m), "mean": _json_num(mu),
            "steps": self.steps, "settings": self.settings,
            "history_steps": self.history_steps.tolist(), "history": clean(self.history.flatten(1)) if
            self.history.numel() else [],
        }

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def __repr__(self) -> str:
        return (f"LyapunovResult(method={self.settings.get('method')!r}, steps={self.steps}, "
                f"k={self.exponents.shape[-1]}, max={self.max}, mean={self.mean}, "
                f"trivial={int(self.trivial.sum())})")


# ---------------------------------------------------------------------------------------------------- helpers

def _json_num(t: Tensor):
    """A tensor's value(s) for strict JSON: NaN and +-inf become null."""
    v = t.tolist()
    fix = lambda x: x if isinstance(x, float) and math.isfinite(x) else (None if isinstance(x, float) else x)  # noqa
    return [fix(x) for x in v] if isinstance(v, list) else fix(v)


def trivial_count(step, S: int, D: int) -> int:
    """How many exponents of the full S*D spectrum normalisation makes -inf (0 for a callable: unknown)."""
    return step.trivial_count(S, D) if isinstance(step, RecurrentStep) else 0


def radial_basis(step, X: Tensor) -> Optional[Tensor]:
    """Per group, an orthonormal basis of the directions a normalised state cannot move in: [B, S, G, r, N]
    (``RecurrentStep.radial_basis``); None when the step has no normalisation (or is a plain callable)."""
    return step.radial_basis(X) if isinstance(step, RecurrentStep) else None


def project_off(T: Tensor, basis: Optional[Tensor]) -> Tensor:
    """Remove from tangents T [k, B, S, D] their components along ``basis`` [B, S, G, r, N]."""
    if basis is None:
        return T
    G, N = basis.shape[-3], basis.shape[-1]
    Tg = T.unflatten(-1, (G, N))
    coef = torch.einsum("kbsgn,bsgrn->kbsgr", Tg, basis)
    return (Tg - torch.einsum("kbsgr,bsgrn->kbsgn", coef, basis)).flatten(-2)


def _trivial_mask(ex: Tensor, n: int, n_triv: int, dtype: torch.dtype, below: Optional[float]) -> Tensor:
    """ex [B, k] sorted descending: the structural tail (k > n - n_triv) plus anything below ``below``."""
    k = ex.shape[-1]
    mask = torch.zeros_like(ex, dtype=torch.bool)
    extra = k - (n - n_triv)
    if extra > 0:
        mask[..., k - extra:] = True
    if below is None:  # 1000 ulps per step: indistinguishable from rounding noise in this dtype
        below = math.log(1e3 * torch.finfo(dtype).eps)
    return mask | (ex < below)


def fingerprint(step, X0: Tensor, C: Optional[Tensor], settings: Dict[str, Any]) -> str:
    """A hash of the inputs and settings, so a checkpoint is resumed only by the run that wrote it."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = [X0] + ([] if C is None else [C])
    if isinstance(step, torch.nn.Module):
        tensors += [p for _, p in sorted(step.state_dict().items())]
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupt during the write leaves the previous checkpoint intact


def _orthonormalize(V: Tensor, qr_backend: str):
    """QR of the tangents V [k, B, S, D] as B tall-skinny [S*D, k] matrices; returns (Q [k, B, S, D], logd [B, k])."""
    k, B = V.shape[:2]
    n = V[0, 0].numel()
    Q = torch.empty_like(V)
    out = Q.view(k, B, n).permute(1, 2, 0)
    _, logd = qr(V.reshape(k, B, n).permute(1, 2, 0), backend=qr_backend, out=out)
    return Q, logd


def _prepare(step, X0: Tensor, C: Optional[Tensor]):
    return prepare(step, X0, C, name="X0")


def _lin(step, X: Tensor, C: Optional[Tensor], backend: str):
    # the trajectory's states come from the step itself: validated once at the start, not every step
    return linearization(step, X, C=C, backend=backend, check=False)


def _advance(step, X: Tensor, C: Optional[Tensor], backend: str) -> Tensor:
    with torch.no_grad():
        return _lin(step, X, C, backend).out


# ---------------------------------------------------------------------------------------------------- Benettin

def lyapunov_spectrum(step, X0: Tensor, *, C: Optional[Tensor] = None, k: Optional[int] = None, steps: int,
                      burn_in: int = 0, renorm_every: int = 1, project_radial: bool = False, backend: str = "auto",
                      qr_backend: str = "auto", seed: int = 0, history_every: int = 1,
                      checkpoint: Optional[str] = None, checkpoint_every: int = 100, progress: bool = True,
                      trivial_below: Optional[float] = None, parallel: Optional[str] = None,
                      group=None) -> LyapunovResult:
    """The k largest Lyapunov exponents along the trajectory from X0 by the Benettin/QR method.

    ``Q <- qr(J_t Q)`` every ``renorm_every`` steps, ``lambda_i = (1/steps) sum log|R_ii|`` accumulated in float64,
    after ``burn_in`` steps of the state alone. One linearisation per step answers all k tangents (on the analytic
    backends the k tangents share one softmax).

    Args:
        step: a fastjac model or any callable X -> X (called as step(X) or step(X, C)).
        X0: [S, D], or [B, S, D] for B independent trajectories (per-sample results). C: injected input or None.
        k: number of tangents; None means all S*D (S*D <= 4096), or S*D minus the trivial ones when
            ``project_radial``.
        steps: Jacobians in the product (after burn-in). burn_in: state-only steps first.
        renorm_every: re-orthonormalise every m steps (the growth in between must stay in floating-point range).
        project_radial: keep tangents off the directions normalisation kills (fastjac models; needs burn_in >= 1,
            so that states lie where the step puts them).
        backend: Jacobian backend ("auto", "torch", "triton", "autograd"). qr_backend: see ``fastjac.ops.qr``.
        seed: seeds the random initial tangents (sample b of a batch uses seed + b). history_every: record the running estimate every this many
            re-orthonormalisations.
        checkpoint: a file path; the run saves its state there every ``checkpoint_every`` steps and on Ctrl-C, and
            a run started with the same path, inputs and settings resumes from it and ends with exactly the numbers
            of an uninterrupted run (on the same device). The file is left in place at the end.
        progress: show a tqdm progress bar. trivial_below: exponents below this are marked trivial
            (default log(1000 eps) of the dtype: rounding noise), besides the structural -inf of normalisation.
        parallel: None (one process), "samples" (shard a batch of samples across the ranks of ``group``) or
            "tokens" (shard the tokens of each sample); see :mod:`fastjac.distributed`. group: a
            ``torch.distributed`` process group (default: the default group). Every rank returns the same result.

    Returns:
        LyapunovResult with exponents [k] (or [B, k]) descending, trivial mask, max, mean, history.

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(16, 2, dtype=torch.float64)
        >>> X0 = torch.randn(9, 16, dtype=torch.float64)
        >>> res = fj.lyapunov_spectrum(m, X0, k=4, steps=50, burn_in=5, progress=False)
        >>> res.exponents.shape, res.history.shape
        (torch.Size([4]), torch.Size([50, 4]))
    """
    if parallel is not None:
        from ..distributed import lyapunov_spectrum_parallel  # torch.distributed is imported only when asked

        return lyapunov_spectrum_parallel(
            step, X0, C=C, k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
            project_radial=project_radial, backend=backend, qr_backend=qr_backend, seed=seed,
            history_every=history_every, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            progress=progress, trivial_below=trivial_below, parallel=parallel, group=group)
    X, C3, batched = _prepare(step, X0, C)
    B, S, D = X.shape
    n = S * D
    steps = _check_int("steps", steps, 1)
    burn_in = _check_int("burn_in", burn_in, 0)
    renorm_every = _check_int("renorm_every", renorm_every, 1)
    history_every = _check_int("history_every", history_every, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    n_triv = trivial_count(step, S, D)
    if project_radial:
        if radial_basis(step, X) is None:
            raise ValueError("project_radial: needs a fastjac model with a normalisation (ItrSA with norm != 'none', "
                             "or AKOrN)")
        if burn_in < 1:
            raise ValueError("burn_in: project_radial needs burn_in >= 1 so that the states lie on the normalised "
                             "manifold whose tangent space the tangents are kept in")
    n_eff = n - n_triv if project_radial else n
    if k is None:
        if n > FULL_K_LIMIT:
            raise ValueError(f"k: S*D = {n} is over {FULL_K_LIMIT}, where all tangents at once are too costly; pass "
                             f"k (the number of leading exponents wanted, e.g. k=32)")
        k = n_eff
    k = _check_int("k", k, 1)
    if k > n_eff:
        raise ValueError(f"k: expected at most {n_eff} tangents ({'S*D minus the trivial directions' if project_radial else 'S*D'}), got {k}")
    settings = dict(method="benettin", k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
                    project_radial=project_radial, backend=backend, qr_backend=qr_backend, seed=seed,
                    history_every=history_every, dtype=str(X.dtype), shape=list(X0.shape),
                    step=type(step).__name__)
    fp = fingerprint(step, X0, C, settings) if checkpoint else None

    # sample b draws its initial tangents with seed + b: a batched run equals B single runs
    gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]
    st = dict(t=0, X=X, Q=None, sums=torch.zeros(B, k, dtype=torch.float64, device=X.device), hist=[],
              hist_steps=[], renorms=0)
    if checkpoint and os.path.exists(checkpoint):
        saved = torch.load(checkpoint, map_location=X.device, weights_only=False)
        if saved.get("fingerprint") != fp:
            raise ValueError(f"checkpoint: {checkpoint!r} was written by a run with other inputs or settings; "
                             f"delete it or pass another path")
        st = saved["state"]
        for g, r in zip(gens, saved["rng"]):
            g.set_state(r)

    def save():
        if checkpoint:
            _save_checkpoint(checkpoint, dict(fingerprint=fp, state=st, rng=[g.get_state() for g in gens]))

    from tqdm.auto import tqdm

    total = burn_in + steps
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # torch.func (the autograd backend) ignores an outer no_grad, as it should
    bar = tqdm(total=total, initial=st["t"], disable=not progress, desc="lyapunov", unit="step")
    try:
        while st["t"] < total:
            t = st["t"]
            if t < burn_in:
                st["X"] = _advance(step, st["X"], C3, backend)
            else:
                if st["Q"] is None:  # random orthonormal tangents at the first state after burn-in
                    Q0 = torch.stack([torch.randn(k, S, D, generator=g, dtype=torch.float64) for g in gens], 1)
                    Q0 = Q0.to(X.dtype).to(X.device)
                    if project_radial:
                        Q0 = project_off(Q0, radial_basis(step, st["X"]))
                    st["Q"] = _orthonormalize(Q0, qr_backend)[0]
                lin = _lin(step, st["X"], C3, backend)
                V = lin.jvp(st["Q"])
                st["X"] = lin.out
                if project_radial:
                    V = project_off(V, radial_basis(step, st["X"]))
                done = t + 1 - burn_in
                if done % renorm_every == 0 or done == steps:
                    st["Q"], logd = _orthonormalize(V, qr_backend)
                    st["sums"] = st["sums"] + logd
                    st["renorms"] += 1
                    if st["renorms"] % history_every == 0 or done == steps:
                        st["hist"].append(st["sums"] / done)
                        st["hist_steps"].append(done)
                else:
                    st["Q"] = V
            st["t"] = t + 1
            bar.update(1)
            if progress and st["hist"] and st["t"] % 10 == 0:
                bar.set_postfix(lambda_max=f"{st['hist'][-1].max().item():.4f}")
            if checkpoint and st["t"] % checkpoint_every == 0 and st["t"] < total:
                save()
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()
        torch.set_grad_enabled(grad_mode)
    if checkpoint:
        save()

    ex = st["sums"] / steps
    order = torch.argsort(ex, dim=-1, descending=True)
    ex = ex.gather(-1, order)
    hist = torch.stack(st["hist"]).gather(-1, order.unsqueeze(0).expand(len(st["hist"]), -1, -1))
    triv = _trivial_mask(ex, n, 0 if project_radial else n_triv, X.dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    hsteps = torch.tensor(st["hist_steps"])
    if not batched:
        ex, triv, hist = ex[0], triv[0], hist[:, 0]
    return LyapunovResult(ex, triv, hist.cpu(), hsteps, steps, settings)


# ---------------------------------------------------------------------------------------------------- finite time

@renamed_kwargs(T="horizon")
def finite_time_lyapunov(step, X0: Tensor, *, C: Optional[Tensor] = None, horizon: int = 16, k: Optional[int] = None,
                         method: str = "auto", dense_max: int = 1024, backend: str = "auto", tol: float = 1e-8,
                         maxiter: int = 300, seed: int = 0, trivial_below: Optional[float] = None,
                         parallel: Optional[str] = None, group=None) -> LyapunovResult:
    """The paper's finite-horizon exponents ``lambda_i = (1/horizon) ln sigma_i(J_{horizon-1} ... J_0)`` from X0.

    ``method="dense"``: the product of the ``horizon`` dense step Jacobians (in float64) and its SVD, exact, for small S*D
    (the default when S*D <= ``dense_max``). ``method="matrix_free"``: the top-k singular values of the T-step map
    by a Krylov method (``fastjac.linalg.svds``) whose products are chains of ``horizon`` JVPs (forward) and
    VJPs (transpose), with the linearisations cached; no n x n matrix exists.

    Args:
        step, X0, C: as for :func:`lyapunov_spectrum`. horizon: the number of steps (the paper: T = 16; ``T=`` is a deprecated alias).
        k: how many leading exponents; None: all S*D (dense), 32 (matrix-free).
        tol, maxiter, seed: of the matrix-free solver.
        parallel: None, or "samples" to shard a batch across the ranks of ``group`` (:mod:`fastjac.distributed`).

    Returns:
        LyapunovResult (descending exponents [k] or [B, k], trivial mask; empty history).

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(8, 2, dtype=torch.float64)
        >>> res = fj.finite_time_lyapunov(m, torch.randn(5, 8, dtype=torch.float64), horizon=16)
        >>> res.exponents.shape, int(res.trivial.sum())       # 5 tokens: 5 radial directions are -inf
        (torch.Size([40]), 5)
    """
    if parallel is not None:
        from ..distributed import finite_time_lyapunov_parallel

        return finite_time_lyapunov_parallel(
            step, X0, C=C, horizon=horizon, k=k, method=method, dense_max=dense_max, backend=backend, tol=tol,
            maxiter=maxiter, seed=seed, trivial_below=trivial_below, parallel=parallel, group=group)
    X, C3, batched = _prepare(step, X0, C)
    B, S, D = X.shape
    n = S * D
    horizon = _check_int("horizon", horizon, 1)
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'matrix_free', got {method!r}")
    if method == "auto":
        method = "dense" if n <= dense_max else "matrix_free"
    if k is None:
        k = n if method == "dense" else min(32, n)
    k = _check_int("k", k, 1)
    if k > n:
        raise ValueError(f"k: expected at most S*D = {n}, got {k}")
    def trajectory(Xs, Cs):  # the horizon linearisations along the trajectory from Xs
        lins = []
        for _ in range(horizon):
            with torch.no_grad():
                lin = _lin(step, Xs, Cs, backend)
            lins.append(lin)
            Xs = lin.out
        return lins

    if method == "dense":
        check_dense_size(S, D, B, torch.float64, None)
        P = None
        for lin in trajectory(X, C3):
            with torch.no_grad():
                J = lin.dense().double()
            P = J if P is None else J @ P
        sv = torch.linalg.svdvals(P)[..., :k]
    else:
        from ..linalg import svds

        gen = torch.Generator().manual_seed(seed)
        rows = []
        for b in range(B):  # one operator per sample: its own trajectory, B = 1 linearisations
            lins = trajectory(X[b:b + 1], C3 if C3 is None or C3.dim() == 2 else C3[b:b + 1])

            def chain(fwd, lins=lins):
                def apply(V):  # V [r, n] -> [r, n]
                    Tk = V.to(X.dtype).reshape(V.shape[0], 1, S, D)
                    with torch.no_grad():
                        for lin in (lins if fwd else reversed(lins)):
                            Tk = lin.jvp(Tk) if fwd else lin.vjp(Tk)
                    return Tk.reshape(V.shape[0], n).to(V.dtype)
                return apply

            s, ok, cycles = svds(chain(True), chain(False), n, k, dtype=X.dtype, device=X.device, tol=tol,
                                 maxiter=maxiter, seed=gen)
            if not ok:
                warnings.warn(f"finite_time_lyapunov: the matrix-free SVD of sample {b} did not reach tol={tol:g} "
                              f"in maxiter={maxiter} restart cycles; raise maxiter or lower k", RuntimeWarning)
            rows.append(s)
        sv = torch.stack(rows)
    ex = sv.double().log() / horizon
    triv = _trivial_mask(ex, n, trivial_count(step, S, D), X.dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    settings = dict(method=f"finite_time_{method}", horizon=horizon, k=k, backend=backend, dtype=str(X.dtype),
                    shape=list(X0.shape), step=type(step).__name__)
    if not batched:
        ex, triv = ex[0], triv[0]
    return LyapunovResult(ex, triv, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long), horizon,
                          settings)


__all__ = ["LyapunovResult", "lyapunov_spectrum", "finite_time_lyapunov", "trivial_count", "radial_basis",
           "project_off"]
