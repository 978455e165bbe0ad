"""Lyapunov exponents of a recurrent step (DESIGN section 3): Benettin/QR over long trajectories, and the paper's
finite-horizon exponents.

    res = fj.lyapunov_spectrum(model, X0, C=C, k=32, steps=1000, burn_in=100)
    res.exponents, res.stderr, res.max, res.mean, res.history   # descending float64; running estimates for plots

The Benettin loop itself is :mod:`fastjac.analysis.benettin` (the one engine, shared with the parallel runs of
:mod:`fastjac.distributed`); this module supplies its single-process parts (the model's linearisation on the whole
batch, ``fastjac.ops.qr``, one checkpoint file) and the finite-horizon exponents.

Trivial exponents. A normalisation maps each group's radial direction (and, for LayerNorm, the constant direction
too) to zero, so ``S*D/N`` (LayerNorm: ``2*S*D/N``) exponents of a normalised step are -inf (with ``eps > 0`` the
radial direction survives with a factor of about eps/|z|^2 per step: not dynamics either). They are reported as
-inf with a ``trivial`` mask and never enter ``mean``. ``project_radial=True`` instead keeps the tangents on the
tangent space of the normalised states, so the k tangents explore only non-trivial directions.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_dense_size
from .._checks import check_int as _check_int
from .._io import check_writable as _check_writable
from .._io import fingerprint, load_checkpoint, save_atomic, start_over_hint
from ..linearization import linearization, prepare
from .benettin import (  # noqa: F401
    FULL_K_LIMIT,
    LyapunovResult,
    Parts,
    orthonormalize,
    project_off,
    radial_basis,
    run_benettin,
    run_settings,
    trivial_count,
    trivial_mask,
    validate_run,
)

# what a checkpoint file says it is; loaded with torch.load(weights_only=True): tensors, numbers, strings, lists
_CKPT_FORMAT = "fastjac.lyapunov_spectrum.v3"
_STATE_KEYS = (
    "t",
    "X",
    "Q",
    "sums",
    "hist",
    "hist_steps",
    "renorms",
    "m",
    "since",
    "snap",
    "lscale",
    "incr",
    "incr_len",
    "next_check",
    "stopped",
)


def _load_checkpoint(path: str, device) -> Dict[str, Any]:
    """Read a checkpoint safely (no code in the file runs) or raise ValueError saying what is wrong."""
    return load_checkpoint(path, device, _CKPT_FORMAT, _STATE_KEYS)


def _save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    save_atomic(path, state)  # atomic: an interrupt during the write leaves the previous checkpoint intact


def _prepare(step, X0: Tensor, C: Optional[Tensor]):
    return prepare(step, X0, C, name="X0")


def _lin(step, X: Tensor, C: Optional[Tensor], backend):
    # the trajectory's states come from the step itself: validated once at the start, not every step; ``backend``
    # is the Backend object resolved once per run (fastjac.backends.select), so "auto" is not re-decided per step
    return linearization(step, X, C=C, backend=backend, check=False)


def _advance(step, X: Tensor, C: Optional[Tensor], backend) -> Tensor:
    with torch.no_grad():
        return _lin(step, X, C, backend).out


def resolve_backend(step, X: Tensor, backend: str):
    """The backend of a whole run, chosen once (under no_grad, as the run computes): a Backend object."""
    with torch.no_grad():
        return backends.select(step, X, backend)


class FileStore:
    """The single-process checkpoint: one file, fingerprinted, written atomically; a failed write only warns."""

    def __init__(self, path: str, fp: str, device):
        self.path, self.fp, self.device, self.failed = path, fp, device, []

    def load(self):
        if not os.path.exists(self.path):
            _check_writable(self.path)  # an unwritable path is refused before any compute
            return None
        saved = _load_checkpoint(self.path, self.device)
        if saved.get("fingerprint") != self.fp:
            raise ValueError(
                f"checkpoint: {self.path!r} was written by a run with other inputs or settings (model, "
                f"its configuration or weights, X0, C or arguments differ); "
                f"{start_over_hint(self.path)}"
            )
        return saved["state"], saved["rng"]

    def save(self, state, rng, final: bool = False) -> None:
        if self.failed and not final:
            return
        try:
            _save_checkpoint(self.path, dict(format=_CKPT_FORMAT, fingerprint=self.fp, state=state, rng=rng))
        except Exception as e:  # a full disk must not cost the computed exponents
            self.failed.append(e)
            warnings.warn(
                f"lyapunov_spectrum: could not write the checkpoint {self.path!r} ({e}); the run goes on without it",
                RuntimeWarning,
                stacklevel=4,
            )


# ---------------------------------------------------------------------------------------------------- Benettin


def lyapunov_spectrum(
    step,
    X0: Tensor,
    *,
    C: Optional[Tensor] = None,
    k: Optional[int] = None,
    steps: int,
    burn_in: int = 0,
    renorm_every: int = 1,
    project_radial: bool = False,
    backend: str = "auto",
    qr_backend: str = "auto",
    seed: int = 0,
    history_every: int = 1,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    trivial_below: Optional[float] = None,
    tol: Optional[float] = None,
    parallel: Optional[str] = None,
    group=None,
) -> LyapunovResult:
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
        renorm_every: re-orthonormalise every m steps. In between, each tangent is only rescaled to norm 1 (so
            none overflows or underflows), but all of them turn toward the leading directions: after m steps column
            i keeps a part ``|R_ii| / |v_i| ~ exp(-m (lambda_1 - lambda_i))`` independent of the columns before it.
            The rule: at every re-orthonormalisation that part must be at least sqrt(eps) of the dtype (3.5e-4 in
            float32, 1.5e-8 in float64) for every column that is not a structural -inf direction; otherwise the
            interval is redone from its start with m halved (from then on), and a RuntimeWarning says so.
            ``result.settings["renorm_every_used"]`` is the interval that was finally used. So the result never
            rests on rounding noise; a too-large m only costs the redone steps.
        project_radial: keep tangents off the directions normalisation kills (fastjac models; needs burn_in >= 1,
            so that states lie where the step puts them).
        backend: Jacobian backend ("auto", "torch", "triton", "autograd"). qr_backend: see ``fastjac.ops.qr``.
        seed: seeds the random initial tangents (sample b of a batch uses seed + b). history_every: record the running estimate every this many
            re-orthonormalisations.
        checkpoint: a file path; the run saves its state there every ``checkpoint_every`` steps and on Ctrl-C, and
            a run started with the same path, inputs and settings resumes from it and ends with exactly the numbers
            of an uninterrupted run (on the same device). The file is left in place at the end. A checkpoint of
            another run (other model class, configuration, weights, X0, C or arguments: see :func:`fingerprint`)
            is refused, and so is a corrupt one (ValueError saying how to start over); it is read with
            ``torch.load(weights_only=True)``, so no code in the file runs. An unwritable path is refused before
            any compute; a write that fails later only warns (the computed exponents are returned).
        progress: show a tqdm progress bar. trivial_below: exponents below this are marked trivial
            (default log(1000 eps) of the dtype: rounding noise), besides the structural -inf of normalisation.
        tol: stop early, at a re-orthonormalisation, once every non-trivial exponent's standard error is below
            ``tol`` (nats per step; checked when the number of intervals has grown by 5 %, at least 4 intervals);
            ``steps`` is then the cap. ``result.steps`` is the number of steps done and ``result.settings`` says
            ``stopped_early``.
        parallel: None (one process), "samples" (shard a batch of samples across the ranks of ``group``) or
            "tokens" (shard the tokens of each sample); see :mod:`fastjac.distributed`. group: a
            ``torch.distributed`` process group (default: the default group). Every rank returns the same result.

    Returns:
        LyapunovResult with exponents [k] (or [B, k]) descending, their standard errors ``stderr`` (batch means of
        the per-interval log growth, see :mod:`fastjac.analysis.benettin` for the method and its assumption),
        trivial mask, max, mean, history.

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
            step,
            X0,
            C=C,
            k=k,
            steps=steps,
            burn_in=burn_in,
            renorm_every=renorm_every,
            project_radial=project_radial,
            backend=backend,
            qr_backend=qr_backend,
            seed=seed,
            history_every=history_every,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            progress=progress,
            trivial_below=trivial_below,
            tol=tol,
            parallel=parallel,
            group=group,
        )
    v = validate_run(
        step,
        X0,
        C,
        k=k,
        steps=steps,
        burn_in=burn_in,
        renorm_every=renorm_every,
        history_every=history_every,
        checkpoint_every=checkpoint_every,
        project_radial=project_radial,
        seed=seed,
        trivial_below=trivial_below,
        qr_backend=qr_backend,
        checkpoint=checkpoint,
        tol=tol,
    )
    X, C3 = v["X"], v["C3"]
    B, S, D = X.shape
    k = v["k"]
    settings = run_settings(v, X0, step, project_radial=project_radial, backend=backend, qr_backend=qr_backend)
    be = resolve_backend(step, X, backend)
    store = None
    if v["checkpoint"]:
        store = FileStore(v["checkpoint"], fingerprint(step, X0, C, settings), X.device)
    parts = Parts(
        linearize=lambda Xs: _lin(step, Xs, C3, be),
        advance=lambda Xs: _advance(step, Xs, C3, be),
        orthonormalize=lambda V: orthonormalize(V, qr_backend),
        draw=lambda gens: torch.stack([torch.randn(k, S, D, generator=g, dtype=torch.float64) for g in gens], 1),
        radial=lambda Xs: radial_basis(step, Xs),
        n=S * D,
        store=store,
    )
    # sample b draws its initial tangents with seed + b: a batched run equals B single runs
    gens = [torch.Generator().manual_seed(v["seed"] + b) for b in range(B)]
    return run_benettin(
        parts,
        step=step,
        X=X,
        k=k,
        steps=v["steps"],
        burn_in=v["burn_in"],
        renorm_every=v["renorm_every"],
        project_radial=project_radial,
        history_every=v["history_every"],
        checkpoint_every=v["checkpoint_every"],
        gens=gens,
        n_triv=v["n_triv"],
        trivial_below=v["trivial_below"],
        tol=v["tol"],
        batched=v["batched"],
        settings=settings,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------------- finite time

# sweeps of the product QR iteration after the first pass; each one shrinks the coupling between singular values
# of ratio r = sigma_j / sigma_i by r^2, and those within CLUSTER_NATS of each other are resolved by a block SVD
PRODUCT_SWEEPS = 4
CLUSTER_NATS = 10.0
# the dense method keeps horizon triangular factors per sample: samples are processed in chunks of at most this
CHAIN_CHUNK_BYTES = 256 * 2**20


def _qr_pass(chain):
    """One QR pass along a product of square factors (``chain[0]`` applied first): returns the triangular factors
    [G_1, ..., G_T] with ``F_T ... F_1 = W G_T ... G_1`` (W orthogonal), so both products have the same singular
    values."""
    out, W = [], None
    for F in chain:
        W, G = torch.linalg.qr(F if W is None else F @ W)
        out.append(G)
    return out


def product_log_svdvals(chain) -> Tensor:
    """log sigma_i of the product ``R_T ... R_1`` of float64 factors ``chain = [R_1, ..., R_T]`` ([..., n, n]),
    descending, without forming the product (whose SVD loses every sigma_i below eps * sigma_1).

    Method: PRODUCT_SWEEPS passes of the product QR iteration (alternately along the product and along its
    transpose; each pass is a float64 Householder QR per factor), which drive the triangular product towards a
    diagonal one; then the product is accumulated with every row kept at unit norm and its log scale in float64
    (no overflow or underflow), and each cluster of rows whose scales lie within CLUSTER_NATS of each other gets a
    dense SVD of its diagonal block (relative accuracy ~ eps * e^CLUSTER_NATS inside a cluster, while the coupling
    between clusters has decayed like e^(-2 * CLUSTER_NATS * sweeps)).
    """
    for i in range(PRODUCT_SWEEPS):
        chain = _qr_pass([F.mT for F in reversed(chain)]) if i % 2 == 0 else _qr_pass(chain)
    n = chain[0].shape[-1]
    s = torch.zeros(chain[0].shape[:-1], dtype=torch.float64, device=chain[0].device)  # row log scales [..., n]
    Bm = torch.eye(n, dtype=torch.float64, device=s.device).expand_as(chain[0])
    tiny = torch.finfo(torch.float64).tiny
    for F in chain:  # M <- F M with M = diag(e^s) Bm
        la = F.abs().clamp_min(tiny).log() + s.unsqueeze(-2)  # log |F_ij e^{s_j}|
        la = la.masked_fill(F == 0, float("-inf"))
        m = la.amax(-1).clamp_min(-1e300)  # [..., n]; an all-zero row keeps a finite scale
        E = torch.sign(F) * torch.exp(la - m.unsqueeze(-1))  # F_ij e^{s_j - m_i}, entries <= 1
        rows = E @ Bm
        nr = rows.norm(dim=-1).clamp_min(tiny)
        s, Bm = m + nr.log(), rows / nr.unsqueeze(-1)
    out = torch.empty_like(s)
    flat_s, flat_B, flat_o = s.reshape(-1, n), Bm.reshape(-1, n, n), out.reshape(-1, n)
    for b in range(flat_s.shape[0]):
        order = torch.argsort(flat_s[b], descending=True)
        sb, Bb = flat_s[b][order], flat_B[b][order][:, order]
        vals, i0 = [], 0
        for i in range(1, n + 1):
            if i == n or sb[i - 1] - sb[i] > CLUSTER_NATS:
                blk = torch.exp(sb[i0:i] - sb[i0]).unsqueeze(-1) * Bb[i0:i, i0:i]
                vals.append(sb[i0] + torch.linalg.svdvals(blk).clamp_min(tiny).log())
                i0 = i
        flat_o[b] = torch.sort(torch.cat(vals), descending=True).values
    return out


def finite_time_lyapunov(
    step,
    X0: Tensor,
    *,
    C: Optional[Tensor] = None,
    horizon: int = 16,
    k: Optional[int] = None,
    method: str = "auto",
    dense_max: int = 1024,
    backend: str = "auto",
    tol: float = 1e-8,
    maxiter: int = 300,
    seed: int = 0,
    trivial_below: Optional[float] = None,
    parallel: Optional[str] = None,
    group=None,
) -> LyapunovResult:
    """The paper's finite-horizon exponents ``lambda_i = (1/horizon) ln sigma_i(J_{horizon-1} ... J_0)`` from X0.

    ``method="dense"``: the product of the ``horizon`` dense step Jacobians (in float64) and its SVD, exact, for small S*D
    (the default when S*D <= ``dense_max``). ``method="matrix_free"``: the top-k singular values of the T-step map
    by a Krylov method (``fastjac.linalg.svds``) whose products are chains of ``horizon`` JVPs (forward) and
    VJPs (transpose), with the linearisations cached; no n x n matrix exists.

    Args:
        step, X0, C: as for :func:`lyapunov_spectrum`. horizon: the number of steps (the paper: T = 16).
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
            step,
            X0,
            C=C,
            horizon=horizon,
            k=k,
            method=method,
            dense_max=dense_max,
            backend=backend,
            tol=tol,
            maxiter=maxiter,
            seed=seed,
            trivial_below=trivial_below,
            parallel=parallel,
            group=group,
        )
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
    be = resolve_backend(step, X, backend)

    def trajectory(Xs, Cs):  # the horizon linearisations along the trajectory from Xs
        lins = []
        for _ in range(horizon):
            with torch.no_grad():
                lin = _lin(step, Xs, Cs, be)
            lins.append(lin)
            Xs = lin.out
        return lins

    if method == "dense":
        check_dense_size(S, D, horizon, torch.float64, None)  # one sample's chain of triangular factors is kept
        # samples in chunks whose chains (chunk * horizon * n^2 float64) stay within CHAIN_CHUNK_BYTES
        chunk = max(1, min(B, CHAIN_CHUNK_BYTES // max(1, horizon * n * n * 8)))
        rows = []
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            chain, W = [], None
            Cb = C3 if C3 is None or C3.dim() == 2 else C3[b0:b1]
            for lin in trajectory(X[b0:b1], Cb):  # first QR pass on the fly: J_t W_{t-1} = W_t R_t (Householder)
                with torch.no_grad():
                    J = lin.dense().double()
                W, R = torch.linalg.qr(J if W is None else J @ W)
                chain.append(R)
            rows.append(product_log_svdvals(chain)[..., :k])
        logsv = torch.cat(rows)
    else:
        from ..linalg import svds

        gen = torch.Generator().manual_seed(seed)
        rows = []
        for b in range(B):  # one operator per sample: its own trajectory, B = 1 linearisations
            lins = trajectory(X[b : b + 1], C3 if C3 is None or C3.dim() == 2 else C3[b : b + 1])

            def chain(fwd, lins=lins):
                def apply(V):  # V [r, n] -> [r, n]
                    Tk = V.to(X.dtype).reshape(V.shape[0], 1, S, D)
                    with torch.no_grad():
                        for lin in lins if fwd else reversed(lins):
                            Tk = lin.jvp(Tk) if fwd else lin.vjp(Tk)
                    return Tk.reshape(V.shape[0], n).to(V.dtype)

                return apply

            s, ok, cycles = svds(
                chain(True), chain(False), n, k, dtype=X.dtype, device=X.device, tol=tol, maxiter=maxiter, seed=gen
            )
            if not ok:
                warnings.warn(
                    f"finite_time_lyapunov: the matrix-free SVD of sample {b} did not reach tol={tol:g} "
                    f"in maxiter={maxiter} restart cycles; raise maxiter or lower k",
                    RuntimeWarning,
                    stacklevel=2,
                )
            rows.append(s)
        logsv = torch.stack(rows).double().log()
        spread = float((logsv[:, 0] - logsv[:, -1]).max())
        if spread > math.log(1 / torch.finfo(X.dtype).eps) - math.log(1e3):
            warnings.warn(
                f"finite_time_lyapunov: the matrix-free SVD works on the {horizon}-step map itself, which "
                f"resolves singular values down to about eps * sigma_max only; sigma_1 / sigma_k = "
                f"e^{spread:.0f} here, so the lower exponents are rounding noise: use method='dense' "
                f"(QR-accumulated, exact) or a shorter horizon",
                RuntimeWarning,
                stacklevel=2,
            )
    ex = logsv / horizon
    triv = trivial_mask(ex, n, trivial_count(step, S, D), X.dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    settings = dict(
        method=f"finite_time_{method}",
        horizon=horizon,
        k=k,
        backend=backend,
        dtype=str(X.dtype),
        shape=list(X0.shape),
        step=type(step).__name__,
    )
    if not batched:
        ex, triv = ex[0], triv[0]
    return LyapunovResult(
        ex, triv, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long), horizon, settings
    )


__all__ = [
    "LyapunovResult",
    "lyapunov_spectrum",
    "finite_time_lyapunov",
    "trivial_count",
    "radial_basis",
    "project_off",
]
