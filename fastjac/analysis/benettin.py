"""The one Benettin/QR engine: every Lyapunov-spectrum run (single-process, sample-parallel, token-parallel) is this
loop with its varying parts passed in as a :class:`Parts`.

What differs between the runs, and is passed in: how a state is linearised (the model's own linearisation, on all
samples or on a shard of them, or the token-parallel one), how the k tangents are orthonormalised (``fastjac.ops.qr``
per sample, or the distributed CholeskyQR2), how the initial tangents are drawn, how column norms and decisions are
reduced over ranks, how results are gathered, and where checkpoints go. What is the same, and lives only here: the
burn-in, the collapse-and-redo rule for ``renorm_every > 1``, the rescaling between re-orthonormalisations, the
overflow and divergence checks, the running history, the standard errors and the ``tol=`` stop, checkpointing and
the assembly of the :class:`LyapunovResult`. So a parallel run takes every decision a single-process run takes, at
the same steps, and returns its numbers to rounding.

    res = fj.lyapunov_spectrum(model, X0, C=C, k=32, steps=1000, burn_in=100)
    res.exponents, res.stderr, res.max, res.mean, res.history

Standard errors (``res.stderr``): batch means. After the burn-in, the run's log growth is a sum of per-interval
increments ``log|R_ii|`` (one per re-orthonormalisation; with ``renorm_every > 1`` an interval's increment covers
its m steps). Those are grouped, in order, into ``nb = floor(sqrt(N))`` contiguous batches of about equal numbers of
steps (N intervals); each batch gives an exponent estimate (its log growth over its steps), and the standard error
is the standard deviation of the batch estimates over sqrt(nb), each batch weighted equally. The assumption: batches
are much longer than the correlation time of the increments (so the batch estimates are nearly independent) and
the tangents have aligned with the Lyapunov vectors early in the run (the alignment transient adds a bias of order
1/steps that the standard error does not cover). With fewer than 4 intervals it is NaN (not enough batches).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .. import config
from .._checks import NonFiniteError, json_safe
from .._checks import check_int as _check_int
from .._compat import make_generator
from ..linearization import prepare
from ..models import RecurrentStep
from ..ops.qr import QR_BACKENDS, qr
from ..ops.qr import qr_backend as _qr_backend_for

# Largest S*D for which k=None means "all S*D tangents"; above it a k must be given.
FULL_K_LIMIT = 4096
# fewest re-orthonormalisation intervals for a standard error (sqrt(4) = 2 batches)
MIN_INTERVALS_FOR_STDERR = 4
# tol= is checked when the number of intervals has grown by this factor since the last check (cost O(log steps))
TOL_CHECK_GROWTH = 1.05


# ---------------------------------------------------------------------------------------------------- the result


@dataclass
class LyapunovResult:
    """Lyapunov exponents of one trajectory per sample.

    Attributes:
        exponents: [k] (or [B, k] for a batched X0), float64, descending; -inf where ``trivial``.
        trivial: bool, exponents' shape: directions killed by normalisation (or below ``trivial_below``).
        history: [R, k] (or [R, B, k]) running estimates at the steps in ``history_steps`` [R] (columns in the
            order of ``exponents``); empty for finite-horizon results.
        steps: number of Jacobians in the product (after burn-in; fewer than asked when ``tol=`` stopped early).
        settings: how it was computed.
        stderr: exponents' shape, float64: the standard error of each exponent (batch means, see
            :mod:`fastjac.analysis.benettin`); NaN where trivial, where there were too few intervals, and for
            finite-horizon results (exact numbers of one product: no sampling error).
    """

    exponents: Tensor
    trivial: Tensor
    history: Tensor
    history_steps: Tensor
    steps: int
    settings: Dict[str, Any] = field(default_factory=dict)
    stderr: Optional[Tensor] = None

    def __post_init__(self):
        if self.stderr is None:
            self.stderr = torch.full_like(self.exponents, float("nan"))

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

    @property
    def max_stderr(self) -> Tensor:
        """The standard error of :attr:`max` (that of the leading non-trivial exponent); 0-dim or [B]."""
        se = self.stderr if self.batched else self.stderr.unsqueeze(0)
        tv = self.trivial if self.batched else self.trivial.unsqueeze(0)
        vals = torch.stack([s[~t][0] if bool((~t).any()) else s.new_tensor(float("nan")) for s, t in zip(se, tv)])
        return vals if self.batched else vals[0]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: -inf exponents (and NaN standard errors) are written as null with the ``trivial`` mask."""

        def clean(t: Tensor):
            return [None if not math.isfinite(v) else v for v in t.tolist()] if t.dim() == 1 else [clean(r) for r in t]

        m, mu = self.max, self.mean
        return json_safe(
            {
                "exponents": clean(self.exponents),
                "stderr": clean(self.stderr),
                "trivial": self.trivial.tolist(),
                "max": _json_num(m),
                "max_stderr": _json_num(self.max_stderr),
                "mean": _json_num(mu),
                "units": "nats per step",
                "steps": self.steps,
                "settings": self.settings,
                "history_steps": self.history_steps.tolist(),
                "history": clean(self.history.flatten(1)) if self.history.numel() else [],
            }
        )

    def save_json(self, path: str) -> None:
        """Write :meth:`to_dict` as strict JSON (no bare NaN/Infinity: non-finite numbers are null)."""
        from .._io import write_json

        write_json(path, self.to_dict(), fallback=False)

    def __repr__(self) -> str:
        return (
            f"LyapunovResult(method={self.settings.get('method')!r}, steps={self.steps}, "
            f"k={self.exponents.shape[-1]}, max={self.max}, mean={self.mean}, "
            f"trivial={int(self.trivial.sum())})"
        )


def _json_num(t: Tensor):
    """A tensor's value(s) for strict JSON: NaN and +-inf become null."""
    v = t.tolist()
    fix = lambda x: x if isinstance(x, float) and math.isfinite(x) else (None if isinstance(x, float) else x)  # noqa
    return [fix(x) for x in v] if isinstance(v, list) else fix(v)


# ---------------------------------------------------------------------------------------------------- helpers


def trivial_count(step, S: int, D: int) -> int:
    """How many exponents of the full S*D spectrum normalisation makes -inf: a fastjac model's, or what a step
    states through a ``trivial_count(S, D)`` method (``fj.as_step`` wrappers); 0 for a plain callable (unknown)."""
    count = getattr(step, "trivial_count", None)
    return int(count(S, D)) if callable(count) else 0


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


def trivial_mask(ex: Tensor, n: int, n_triv: int, dtype: torch.dtype, below: Optional[float]) -> Tensor:
    """ex [B, k] sorted descending: the structural tail (k > n - n_triv) plus anything below ``below``."""
    k = ex.shape[-1]
    mask = torch.zeros_like(ex, dtype=torch.bool)
    extra = k - (n - n_triv)
    if extra > 0:
        mask[..., k - extra :] = True
    if below is None:  # 1000 ulps per step: indistinguishable from rounding noise in this dtype
        below = math.log(1e3 * torch.finfo(dtype).eps)
    return mask | (ex < below)


_trivial_mask = trivial_mask  # the name fastjac.distributed used


def orthonormalize(V: Tensor, qr_backend: str):
    """QR of the tangents V [k, B, S, D] as B tall-skinny [S*D, k] matrices; returns (Q [k, B, S, D], logd [B, k])."""
    k, B = V.shape[:2]
    n = V[0, 0].numel()
    Q = torch.empty_like(V)
    out = Q.view(k, B, n).permute(1, 2, 0)
    _, logd = qr(V.reshape(k, B, n).permute(1, 2, 0), backend=qr_backend, out=out)
    return Q, logd


def local_colnorms(V: Tensor) -> Tensor:
    """Norms of the k tangent columns V [k, B, S, D] per sample: [k, B] float64."""
    return V.reshape(V.shape[0], V.shape[1], -1).double().norm(dim=-1)


def _base_seed(seed) -> int:
    """The int seed of the tangents (sample b uses seed + b); a torch.Generator gives one draw from it."""
    g = make_generator(seed)  # validates: an int >= 0 or a torch.Generator
    if seed is None:
        raise TypeError("seed: expected an int or a torch.Generator, got NoneType")
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (), generator=g))
    return seed


def _check_opt_float(name: str, v, positive: bool = False) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number or None, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name}: expected a number > 0 or None, got {v!r}")
    return float(v)


def _fmt_ratio(logr: float) -> str:
    if math.isnan(logr):
        return "lost (the tangents overflowed)"
    if logr == float("-inf"):
        return "lost (the tangents left the dtype's full-precision range, or a column became dependent)"
    return f"{math.exp(logr):.1e} of its norm"


def _hint(step) -> str:
    if getattr(step, "norm", None) == "none":
        return "norm='none': nothing bounds the state"
    return "nothing in the step bounds the state" if not isinstance(step, RecurrentStep) else "the step diverges"


def batch_means_stderr(incr: Tensor, lens: Tensor) -> Tensor:
    """Standard error of the per-step mean of a sequence of interval increments by batch means.

    Args:
        incr: [N, B, k] float64 log growths of N consecutive intervals. lens: [N] their numbers of steps.

    Returns:
        [B, k] float64: std over ``nb = floor(sqrt(N))`` contiguous batches (of about equal steps) of the batch
        estimates (sum incr / sum lens), divided by sqrt(nb); NaN when N < 4.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> se = batch_means_stderr(torch.randn(400, 1, 2, dtype=torch.float64, generator=g), torch.ones(400))
        >>> bool(((se - 0.05).abs() < 0.02).all())     # iid unit noise: 1 / sqrt(400)
        True
    """
    N = incr.shape[0]
    if N < MIN_INTERVALS_FOR_STDERR:
        return torch.full(incr.shape[1:], float("nan"), dtype=torch.float64, device=incr.device)
    nb = int(math.isqrt(N))
    cum = torch.cumsum(lens.double().to(incr.device), 0)
    total = float(cum[-1])
    # batch of interval i: by the step at which it ends, so batches hold about equal numbers of steps
    which = torch.clamp(((cum - 0.5) * nb / total).long(), max=nb - 1)
    sums = torch.zeros((nb,) + tuple(incr.shape[1:]), dtype=torch.float64, device=incr.device)
    sums.index_add_(0, which, incr)
    steps = torch.zeros(nb, dtype=torch.float64, device=incr.device).index_add_(0, which, lens.double().to(incr.device))
    est = sums / steps.clamp_min(1)[:, None, None]
    return est.std(dim=0, unbiased=True) / math.sqrt(nb)


# ---------------------------------------------------------------------------------------------------- validation


def validate_run(
    step,
    X0: Tensor,
    C: Optional[Tensor],
    *,
    k,
    steps,
    burn_in,
    renorm_every,
    history_every,
    checkpoint_every,
    project_radial,
    seed,
    trivial_below,
    qr_backend,
    checkpoint,
    tol=None,
) -> Dict[str, Any]:
    """Every argument check of a Benettin run, once, before any compute (the single-process and parallel runs).

    Returns the validated values: X [B, S, D], C3, batched, k, steps, burn_in, renorm_every, history_every,
    checkpoint_every, seed, trivial_below, checkpoint, tol and n_triv (the structural -inf count).
    """
    import os

    X, C3, batched = prepare(step, X0, C, name="X0")
    B, S, D = X.shape
    n = S * D
    steps = _check_int("steps", steps, 1)
    burn_in = _check_int("burn_in", burn_in, 0)
    renorm_every = _check_int("renorm_every", renorm_every, 1)
    history_every = _check_int("history_every", history_every, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    seed = _base_seed(seed)
    trivial_below = _check_opt_float("trivial_below", trivial_below)
    tol = _check_opt_float("tol", tol, positive=True)
    if qr_backend not in QR_BACKENDS:
        raise ValueError(f"qr_backend: expected one of {QR_BACKENDS}, got {qr_backend!r}")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint: expected a file path or None, got {type(checkpoint).__name__}")
        checkpoint = os.fspath(checkpoint)
    n_triv = trivial_count(step, S, D)
    if project_radial:
        if radial_basis(step, X) is None:
            raise ValueError(
                "project_radial: needs a fastjac model with a normalisation (ItrSA with norm != 'none', or AKOrN)"
            )
        if burn_in < 1:
            raise ValueError(
                "burn_in: project_radial needs burn_in >= 1 so that the states lie on the normalised "
                "manifold whose tangent space the tangents are kept in"
            )
    n_eff = n - n_triv if project_radial else n
    if k is None:
        if n > FULL_K_LIMIT:
            raise ValueError(
                f"k: S*D = {n} is over {FULL_K_LIMIT}, where all tangents at once are too costly; pass "
                f"k (the number of leading exponents wanted, e.g. k=32)"
            )
        k = n_eff
    k = _check_int("k", k, 1)
    if k > n_eff:
        what = "S*D minus the trivial directions" if project_radial else "S*D"
        raise ValueError(f"k: expected at most {n_eff} tangents ({what}), got {k}")
    try:  # an unusable QR backend is refused now, not after the burn-in
        _qr_backend_for(torch.empty(0, n, k, dtype=X.dtype, device=X.device), qr_backend)
    except (ValueError, TypeError) as e:
        raise type(e)(f"qr_backend: {str(e).split(': ', 1)[-1]}") from None
    return dict(
        X=X,
        C3=C3,
        batched=batched,
        k=k,
        steps=steps,
        burn_in=burn_in,
        renorm_every=renorm_every,
        history_every=history_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
        trivial_below=trivial_below,
        checkpoint=checkpoint,
        n_triv=n_triv,
        tol=tol,
    )


def run_settings(v: Dict[str, Any], X0: Tensor, step, *, project_radial, backend, qr_backend) -> Dict[str, Any]:
    """The settings a run records (and fingerprints), from validate_run's values."""
    X = v["X"]
    out = dict(
        method="benettin",
        k=v["k"],
        steps=v["steps"],
        burn_in=v["burn_in"],
        renorm_every=v["renorm_every"],
        project_radial=project_radial,
        backend=backend,
        qr_backend=qr_backend,
        seed=v["seed"],
        history_every=v["history_every"],
        dtype=str(X.dtype),
        shape=list(X0.shape),
        step=type(step).__name__,
        device=str(X.device),
    )
    if v["tol"] is not None:
        out["tol"] = v["tol"]
    return out


# ---------------------------------------------------------------------------------------------------- the parts


def _identity_reduce(t: Tensor, op: str) -> Tensor:
    return t


@dataclass
class Parts:
    """What one kind of run plugs into :func:`run_benettin`.

    linearize(X) -> an object with ``.out`` (the next state) and ``.jvp(Q)`` (Q [k, B, S_p, D]).
    advance(X) -> the next state (burn-in: no tangents).
    orthonormalize(V [k, B, S_p, D]) -> (Q, logd [B, k] float64): identical logd on every rank that shares a sample.
    draw(gens) -> initial tangents [k, B, S_p, D] float64 (sample b from ``gens[b]``).
    radial(X) -> the radial basis of X or None (``project_radial``).
    colnorms(V) -> [k, B] float64 norms of the tangent columns over the whole state (all ranks' rows).
    reduce(t, op) -> t reduced over ranks, op "max" or "min" (1-D float64; identity for one process).
    gather(sums, hist, incr) -> the same over all samples (sample-parallel: concatenated in input order).
    n: S*D of one whole sample. active: False on a rank holding no samples (it only takes part in collectives).
    store: checkpoints (``load() -> (state, rng) | None``, ``save(state, rng, final)``) or None.
    check_each_step: raise on a non-finite state at the step it appears (one process); otherwise the flags are
    agreed over ranks at every re-orthonormalisation and at the end of the burn-in.
    save_on_interrupt: write a checkpoint on Ctrl-C (one process; a collective write cannot be done then).
    """

    linearize: Callable
    advance: Callable
    orthonormalize: Callable
    draw: Callable
    radial: Callable
    n: int
    colnorms: Callable = local_colnorms
    reduce: Callable = _identity_reduce
    gather: Optional[Callable] = None
    active: bool = True
    store: Any = None
    check_each_step: bool = True
    save_on_interrupt: bool = True


# ---------------------------------------------------------------------------------------------------- the engine


def _independence(logd: Tensor, norms: Tensor, n: int, dtype, n_track: int) -> float:
    """log of the smallest |R_ii| / |v_i| over the first n_track columns (logd [B, k], norms [B, k] float64): how much
    of each column is independent of the ones before it, the worst over the batch. -inf when a column left the range
    where the dtype keeps full precision (entries near underflow or overflow). +inf for an empty batch."""
    if norms.numel() == 0:
        return float("inf")
    fi = torch.finfo(dtype)
    lo = math.log(fi.tiny / fi.eps) + 0.5 * math.log(n)  # entries ~ |v| / sqrt(n) must stay far from subnormal
    hi = math.log(fi.max * fi.eps) - 0.5 * math.log(n)
    ln = norms.log()
    if not bool(((ln > lo) & (ln < hi)).all()):
        return float("-inf")
    ratio = logd - ln
    return float(ratio[:, :n_track].min()) if n_track > 0 else float("inf")


def run_benettin(
    parts: Parts,
    *,
    step,
    X: Tensor,
    k: int,
    steps: int,
    burn_in: int,
    renorm_every: int,
    project_radial: bool,
    history_every: int,
    checkpoint_every: int,
    gens: List[torch.Generator],
    n_triv: int,
    trivial_below: Optional[float],
    tol: Optional[float],
    batched: bool,
    settings: Dict[str, Any],
    progress: bool = False,
) -> LyapunovResult:
    """Run the Benettin/QR iteration with ``parts`` from the state X [B, S_p, D] (this rank's) and assemble the
    result. The rules (see ``fastjac.lyapunov_spectrum`` for the user's view):

    - burn-in: ``burn_in`` steps of the state alone; then k random orthonormal tangents (sample b: ``gens[b]``).
    - every ``m`` steps (m = ``renorm_every``, halved on collapse) the tangents are orthonormalised and
      ``log|R_ii|`` (plus the log scales of the rescalings in between) accumulated in float64; in between each
      column is rescaled to norm 1.
    - collapse-and-redo: when, at a re-orthonormalisation after m > 1 steps, some tracked column's part independent
      of the columns before it is below sqrt(eps) of its norm, or the tangents overflowed, the interval is redone
      from its start with m halved (from then on); the decision is agreed over ranks (``parts.reduce``).
    - non-finite states or tangents raise NonFiniteError; a state that grew by 1e6 warns (divergence).
    - ``tol``: stop at a re-orthonormalisation once every non-trivial exponent's standard error is below tol.
    """
    B = X.shape[0]
    n, dtype, dev = parts.n, X.dtype, X.device
    renorm_tol = math.sqrt(torch.finfo(dtype).eps)  # a column part below this fraction is rounding noise
    n_track = k if project_radial else min(k, n - n_triv)  # columns that measure real (not structural -inf) growth
    total = burn_in + steps
    zeros = lambda: torch.zeros(B, k, dtype=torch.float64, device=dev)  # noqa: E731
    st: Dict[str, Any] = dict(
        t=0,
        X=X,
        Q=None,
        sums=zeros(),
        hist=[],
        hist_steps=[],
        renorms=0,
        m=renorm_every,
        since=0,
        snap=None,
        shrunk=[],
        lscale=zeros(),
        incr=[],
        incr_len=[],
        next_check=0,
        stopped=None,
    )
    if parts.store is not None:
        saved = parts.store.load()
        if saved is not None:
            state, rng = saved
            st.update(state)
            for g, r in zip(gens, rng):
                g.set_state(r)

    def save(final: bool = False):
        if parts.store is not None:
            parts.store.save(st, [g.get_state() for g in gens], final)

    bad = dict(step=None, prev=0.0)  # the first non-finite state on this rank (agreed at the sync points)

    def check_state(Xn: Tensor, Xp: Tensor, t: int):
        if bad["step"] is None and parts.active and check_states and not bool(torch.isfinite(Xn).all()):
            bad.update(step=t, prev=Xp.abs().max().item())
            if parts.check_each_step:
                raise_bad()

    def raise_bad():
        raise NonFiniteError(
            f"X0: the trajectory overflowed at step {bad['step']} of {total} (the state became "
            f"inf/NaN; its largest entry was {bad['prev']:.3g} one step before; {_hint(step)}). "
            f"Use fewer steps, a smaller eta or a normalised model" + (" or float64" if dtype != torch.float64 else "")
        )

    def agree(*vals: float, ops=None) -> List[float]:
        """Reduce scalars over ranks: ops[i] "min" or "max" (one all-reduce per op kind)."""
        ops = ops or ["min"] * len(vals)
        out = list(vals)
        for op in ("min", "max"):
            idx = [i for i, o in enumerate(ops) if o == op]
            if idx:
                red = parts.reduce(torch.tensor([vals[i] for i in idx], dtype=torch.float64), op)
                for j, i in enumerate(idx):
                    out[i] = float(red[j])
        return out

    def sync_bad(*flags: float) -> List[float]:
        """Agree on the first non-finite state (raise on every rank if any rank has one) and on ``flags``
        (max-reduced); returns the reduced flags."""
        first = float("inf") if bad["step"] is None else float(bad["step"])
        got = agree(first, *flags, ops=["min"] + ["max"] * len(flags))
        if math.isfinite(got[0]):
            if bad["step"] is None:
                bad.update(step=int(got[0]), prev=float("nan"))
            raise_bad()
        return got[1:]

    from tqdm.auto import tqdm

    check_states = config.check_finite
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # torch.func (the autograd backend) ignores an outer no_grad, as it should
    bar = tqdm(total=total, initial=st["t"], disable=not progress, desc="lyapunov", unit="step")
    try:
        while st["t"] < total and st["stopped"] is None:
            t = st["t"]
            if t < burn_in:
                if parts.active:
                    Xn = parts.advance(st["X"])
                    check_state(Xn, st["X"], t + 1)
                    st["X"] = Xn
                if t + 1 == burn_in and not parts.check_each_step:
                    sync_bad()
            else:
                if st["Q"] is None and parts.active:  # random orthonormal tangents at the first state after burn-in
                    Q0 = parts.draw(gens).to(dtype).to(dev)
                    if project_radial:
                        Q0 = project_off(Q0, parts.radial(st["X"]))
                    st["Q"] = parts.orthonormalize(Q0)[0]
                if st["since"] == 0:  # start of a re-orthonormalisation interval: what a redo goes back to
                    st["snap"] = (t, st["X"], st["Q"])
                V = None
                if parts.active:
                    lin = parts.linearize(st["X"])
                    V = lin.jvp(st["Q"])
                    check_state(lin.out, st["X"], t + 1)
                    st["X"] = lin.out
                    if project_radial:
                        V = project_off(V, parts.radial(st["X"]))
                st["since"] += 1
                done = t + 1 - burn_in
                if st["since"] == st["m"] or done == steps:
                    fin = not parts.active or not check_states or bool(torch.isfinite(V).all())
                    if not parts.check_each_step:  # every rank takes the same decision
                        fin = sync_bad(0.0 if fin else 1.0)[0] == 0.0
                    logd, norms = None, None
                    if fin and parts.active:
                        Qn, logd = parts.orthonormalize(V)
                        norms = parts.colnorms(V).transpose(0, 1)  # [B, k]
                    if fin and st["since"] > 1:
                        local = _independence(logd, norms, n, dtype, n_track) if parts.active else float("inf")
                        (worst,) = agree(local)
                    else:
                        worst = 0.0
                    if st["since"] > 1 and not (fin and worst >= math.log(renorm_tol)):
                        # the tangents collapsed (or overflowed) within the interval: redo it, re-orthonormalising
                        # twice as often (from here on), so no exponent is computed from rounding noise
                        t0, Xs, Qs = st["snap"]
                        st["shrunk"].append((done, st["since"], worst if fin else float("nan")))
                        if progress:
                            bar.write(
                                f"lyapunov: re-orthonormalising every {max(1, st['since'] // 2)} steps instead "
                                f"of {st['since']} (the tangents collapsed); redoing steps {t0 + 1}-{t + 1}"
                            )
                        st.update(t=t0, X=Xs, Q=Qs, since=0, m=max(1, st["since"] // 2), lscale=st["lscale"] * 0)
                        bar.n = t0
                        bar.refresh()
                        continue
                    if not fin:
                        raise NonFiniteError(
                            f"X0: the tangents overflowed (inf/NaN) at step {t + 1} of {total}; "
                            f"the step is not differentiable there or grows too fast for {dtype}"
                        )
                    inc = (logd + st["lscale"]) if parts.active else zeros()
                    if parts.active:
                        st["Q"] = Qn
                    st["sums"] = st["sums"] + inc
                    st["incr"].append(inc)
                    st["incr_len"].append(st["since"])
                    st["lscale"] = st["lscale"] * 0
                    st["renorms"] += 1
                    st["since"] = 0
                    if st["renorms"] % history_every == 0 or done == steps:
                        st["hist"].append(st["sums"] / done)
                        st["hist_steps"].append(done)
                    if (
                        tol is not None
                        and done < steps
                        and st["renorms"] >= max(st["next_check"], MIN_INTERVALS_FOR_STDERR)
                    ):
                        st["next_check"] = max(st["renorms"] + 1, int(st["renorms"] * TOL_CHECK_GROWTH))
                        se = batch_means_stderr(torch.stack(st["incr"]), torch.tensor(st["incr_len"]))
                        ex_now = st["sums"] / done
                        order = torch.argsort(ex_now, dim=-1, descending=True)
                        triv = trivial_mask(
                            ex_now.gather(-1, order), n, 0 if project_radial else n_triv, dtype, trivial_below
                        )
                        se_sorted = se.gather(-1, order).masked_fill(triv, 0.0)
                        local = float(se_sorted.max()) if se_sorted.numel() else 0.0
                        local = float("inf") if math.isnan(local) else local
                        (worst_se,) = agree(local, ops=["max"])
                        if worst_se < tol:
                            st["stopped"] = done
                            if st["hist_steps"][-1:] != [done]:
                                st["hist"].append(st["sums"] / done)
                                st["hist_steps"].append(done)
                elif parts.active:
                    # between re-orthonormalisations each column is rescaled to norm 1 (its log norm kept in
                    # float64): directions are unchanged, and no tangent can overflow or underflow
                    nrm = parts.colnorms(V)  # [k, B] float64, over the whole state
                    st["lscale"] = st["lscale"] + nrm.log().transpose(0, 1)
                    st["Q"] = V / nrm.to(V.dtype).clamp_min(torch.finfo(V.dtype).tiny)[:, :, None, None]
            st["t"] = t + 1
            bar.update(1)
            if progress and st["hist"] and st["t"] % 10 == 0 and st["hist"][-1].numel():
                bar.set_postfix(lambda_max=f"{st['hist'][-1].max().item():.4f}")
            if (
                parts.store is not None
                and st["t"] % checkpoint_every == 0
                and st["t"] < total
                and st["stopped"] is None
            ):
                save()
    except KeyboardInterrupt:
        if parts.save_on_interrupt:
            save(final=True)
        raise
    finally:
        bar.close()
        torch.set_grad_enabled(grad_mode)
    if not parts.check_each_step:
        sync_bad()
    a0 = X.abs().max().item() if parts.active and X.numel() else 0.0
    a1 = st["X"].abs().max().item() if parts.active and X.numel() else 0.0
    a0, a1 = agree(a0, a1 if math.isfinite(a1) else -1.0, ops=["max", "max"])
    if parts.store is not None:
        save(final=True)  # the result is computed: a failed write only warns
    sums, hist, incr = st["sums"], st["hist"], st["incr"]
    if parts.gather is not None:
        sums, hist, incr = parts.gather(sums, hist, incr)
    return _assemble(
        st,
        sums,
        hist,
        incr,
        step=step,
        steps=steps,
        k=k,
        n=n,
        n_triv=n_triv,
        dtype=dtype,
        project_radial=project_radial,
        trivial_below=trivial_below,
        batched=batched,
        tol=tol,
        renorm_every=renorm_every,
        settings=settings,
        a0=a0,
        a1=a1,
    )


def _assemble(
    st,
    sums,
    hist,
    incr,
    *,
    step,
    steps,
    k,
    n,
    n_triv,
    dtype,
    project_radial,
    trivial_below,
    batched,
    tol,
    renorm_every,
    settings,
    a0,
    a1,
) -> LyapunovResult:
    """The result, once: sort, mask the trivial exponents, standard errors, settings, warnings."""
    done = st["stopped"] if st["stopped"] is not None else steps
    dev = sums.device
    ex = sums / done
    order = torch.argsort(ex, dim=-1, descending=True)
    ex = ex.gather(-1, order)
    H = torch.stack([h.to(dev) for h in hist])
    H = H.gather(-1, order.unsqueeze(0).expand(len(hist), -1, -1))
    se = batch_means_stderr(torch.stack([i.to(dev) for i in incr]), torch.tensor(st["incr_len"], dtype=torch.float64))
    se = se.gather(-1, order)
    triv = trivial_mask(ex, n, 0 if project_radial else n_triv, dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    se = se.masked_fill(triv, float("nan"))
    hsteps = torch.tensor(st["hist_steps"])
    if not batched:
        ex, triv, H, se = ex[0], triv[0], H[:, 0], se[0]
    out_settings = dict(
        settings,
        renorm_every_used=st["m"],
        stderr_method="batch means of the per-interval log growth (floor(sqrt(intervals)) batches)",
    )
    if tol is not None:
        out_settings.update(tol=tol, steps_requested=steps, stopped_early=st["stopped"] is not None)
    if st["m"] < renorm_every:
        d, m_bad, w = st["shrunk"][0]
        renorm_tol = math.sqrt(torch.finfo(dtype).eps)
        warnings.warn(
            f"lyapunov_spectrum: renorm_every={renorm_every} lets the tangents collapse onto the leading "
            f"directions (after {m_bad} steps a column's part independent of the others was "
            f"{_fmt_ratio(w)}, where at least sqrt(eps) = {renorm_tol:.1e} of {dtype} is needed, or the "
            f"lower exponents are rounding noise); those intervals were redone, re-orthonormalising every "
            f"{st['m']} steps (result.settings['renorm_every_used'])",
            RuntimeWarning,
            stacklevel=4,
        )
    if math.isfinite(a1) and a1 > 1e6 * max(a0, 1.0):
        warnings.warn(
            f"lyapunov_spectrum: the state grew from max|X0| = {a0:.3g} to {a1:.3g} ({_hint(step)}): the "
            f"trajectory diverges, and the exponents measure that growth, not the dynamics on an "
            f"attractor",
            RuntimeWarning,
            stacklevel=4,
        )
    return LyapunovResult(ex, triv, H.cpu(), hsteps, done, out_settings, se.cpu())


__all__ = [
    "LyapunovResult",
    "Parts",
    "run_benettin",
    "run_settings",
    "validate_run",
    "batch_means_stderr",
    "trivial_count",
    "radial_basis",
    "project_off",
    "trivial_mask",
    "orthonormalize",
    "local_colnorms",
    "FULL_K_LIMIT",
]
