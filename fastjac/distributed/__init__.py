"""Lyapunov spectra across processes with ``torch.distributed`` (gloo on CPUs, NCCL on GPUs), launched by torchrun.

Two modes, chosen by ``parallel=`` of :func:`fastjac.lyapunov_spectrum` (and of :func:`fastjac.finite_time_lyapunov`
for "samples"); both take the default process group or ``group=`` and return the same result on every rank.

``parallel="samples"`` (many inputs): the full batch ``X0 [B, S, D]`` is given on every rank; rank r of P runs the
contiguous samples ``[r*B/P, (r+1)*B/P)`` (the first ``B % P`` ranks take one more; a rank may hold none and still
takes part in every collective). Sample b draws its initial tangents with ``seed + b`` (its global index), as in a
single-process batched run, so the per-sample exponents do not depend on P. The per-sample results are gathered on
every rank in input order. :func:`map_samples` does the same for any per-sample analysis function.

``parallel="tokens"`` (one input too long for one device): ``X0`` (and C) are the *full* state on every rank (each
rank slices its block; pass the same tensor everywhere); rank r keeps tokens ``[r*S/P, (r+1)*S/P)`` of X, C and of
all k tangents (``fastjac.distributed.tokens``: ring attention with the online-softmax merge, tangent accumulators
included), and the QR of the distributed tangent matrix is CholeskyQR2 with one all-reduce of the k x k Grams per
pass (``fastjac.distributed.qr``; TSQR fallback). Every rank ends with the same exponents, equal to a
single-process run's to rounding (1e-10 in float64 in the tests). ItrSA and AKOrN; forward + JVP only.
The initial tangents are drawn in full ([k, S, D] per sample, then sliced) so that they equal the single-process
ones: the one O(k S D) transient of the mode.

Checkpoints: one file per rank, atomic, resumed only by the same inputs, settings, mode and world size
(``fastjac.distributed.engine``). Both modes run the one Benettin engine (``fastjac.analysis.benettin``) that the
single-process run uses, with the same collapse-and-redo rule, rescaling, checks, standard errors and ``tol=``.
Token-parallel linearisations are registered per exact model class (:func:`register_token_linearizer`): an ItrSA
subclass that is not registered is refused, never given ItrSA's Jacobian. See docs/distributed.md for launching, costs and when each mode pays.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _comm
from ._comm import STATS, reset_stats, shard_bounds
from .tokens import register_token_linearizer

MODES = ("samples", "tokens")


def _check_mode(parallel: str) -> None:
    if parallel not in MODES:
        raise ValueError(f"parallel: expected None, 'samples' or 'tokens', got {parallel!r}")


def lyapunov_spectrum_parallel(
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
    parallel: str = "samples",
    group=None,
):
    """:func:`fastjac.lyapunov_spectrum` sharded over the ranks of ``group`` (default: the default process group).

    Args: those of :func:`fastjac.lyapunov_spectrum`, plus
        parallel: "samples" (shard the batch X0 [B, S, D] by samples) or "tokens" (shard each sample's tokens;
            ItrSA / AKOrN only; ``backend`` must be "auto" or "torch": the ring attention is in torch ops).
            X0 and C are the full inputs, the same on every rank, in both modes.
        checkpoint: a path prefix; rank r of P writes ``<checkpoint>.rank<r>-of<P>.step<t>`` (see
            ``fastjac.distributed.engine``); a restarted job with the same world size resumes bit for bit.
        progress: a bar on rank 0 only.

    Returns:
        The same :class:`~fastjac.LyapunovResult` on every rank: exponents [k] (or [B, k]) as a single-process run
        gives (``settings`` gains ``parallel`` and ``world_size``).

    Example (a process group must exist; under ``torchrun --nproc_per_node=2``):
        >>> import torch, torch.distributed as dist, fastjac as fj  # doctest: +SKIP
        >>> dist.init_process_group("gloo")  # doctest: +SKIP
        >>> m = fj.ItrSA(16, 2, dtype=torch.float64)  # doctest: +SKIP
        >>> res = fj.lyapunov_spectrum(m, torch.randn(64, 16, dtype=torch.float64), k=8, steps=100,
        ...                            parallel="tokens")  # doctest: +SKIP
    """
    from .._io import fingerprint
    from ..analysis.benettin import run_benettin, run_settings, validate_run
    from .engine import ShardCheckpoint, ShardStore

    _check_mode(parallel)
    group = _comm.resolve_group(group, what="parallel")
    r, P = _comm.rank_and_size(group)
    # the single-process run's checks, so both refuse the same inputs with the same messages
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
    settings = dict(
        run_settings(v, X0, step, project_radial=project_radial, backend=backend, qr_backend=qr_backend),
        parallel=parallel,
        world_size=P,
    )
    settings.pop("device")  # ranks may sit on different devices of one kind
    if parallel == "tokens":  # refused before any checkpoint file is looked at
        from .tokens import token_why_not

        why = token_why_not(step)
        if why is not None:
            raise ValueError(f"step: {why}")
    store = None
    if v["checkpoint"]:
        store = ShardStore(
            ShardCheckpoint(v["checkpoint"], group, fingerprint(step, X0, C, settings), parallel, X.device)
        )
    common = dict(k=v["k"], backend=backend, qr_backend=qr_backend, seed=v["seed"], store=store)
    if parallel == "samples":
        from .samples import sample_parts

        parts, Xl, gens = sample_parts(step, X, C3, group, **common)
    else:
        from .tokens import token_parts

        parts, Xl, gens = token_parts(step, X, C3, group, **common)
    return run_benettin(
        parts,
        step=step,
        X=Xl,
        k=v["k"],
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
        progress=progress and r == 0,
    )


def finite_time_lyapunov_parallel(
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
    parallel: str = "samples",
    group=None,
):
    """:func:`fastjac.finite_time_lyapunov` with the batch X0 [B, S, D] sharded over the ranks (``parallel="samples"``).

    The dense method is seed-free: the result equals a single-process batched run. The matrix-free method seeds
    sample b's solver with ``seed + b`` (its global index), so results do not depend on the number of ranks (a
    single-process batched run instead draws all samples from one generator seeded ``seed``: its matrix-free
    results differ from these at the solver's tolerance). ``parallel="tokens"`` is refused: the matrix-free SVD
    needs VJPs, which the token-parallel linearisation does not provide.
    """
    from ..analysis.benettin import LyapunovResult
    from ..analysis.lyapunov import finite_time_lyapunov
    from ..linearization import prepare

    _check_mode(parallel)
    if parallel == "tokens":
        raise ValueError(
            "parallel: finite_time_lyapunov supports 'samples' only (its dense product and its "
            "matrix-free SVD need the whole state and VJPs); use lyapunov_spectrum(parallel='tokens')"
        )
    group = _comm.resolve_group(group, what="parallel")
    r, P = _comm.rank_and_size(group)
    X, C3, batched = prepare(step, X0, C, name="X0")
    B, S, D = X.shape
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'matrix_free', got {method!r}")
    resolved = ("dense" if S * D <= dense_max else "matrix_free") if method == "auto" else method
    lo, hi = shard_bounds(B, P, r)
    kw = dict(
        horizon=horizon,
        k=k,
        method=resolved,
        dense_max=dense_max,
        backend=backend,
        tol=tol,
        maxiter=maxiter,
        trivial_below=trivial_below,
    )
    Cs = lambda a, b: C3 if C3 is None or C3.dim() == 2 else C3[a:b]  # noqa: E731
    local = None
    if hi > lo:
        if resolved == "dense":
            res = finite_time_lyapunov(step, X[lo:hi], C=Cs(lo, hi), seed=seed, **kw)
            local = (res.exponents.cpu(), res.trivial.cpu(), res.settings)
        else:
            parts = [
                finite_time_lyapunov(step, X[b : b + 1], C=Cs(b, b + 1), seed=seed + b, **kw) for b in range(lo, hi)
            ]
            local = (
                torch.cat([p.exponents for p in parts]).cpu(),
                torch.cat([p.trivial for p in parts]).cpu(),
                parts[0].settings,
            )
    got = [g for g in _comm.gather_objects(local, group) if g is not None]
    ex = torch.cat([g[0] for g in got]).to(X.device)
    triv = torch.cat([g[1] for g in got]).to(X.device)
    settings = dict(got[0][2], shape=list(X0.shape), parallel="samples", world_size=P)
    if not batched:
        ex, triv = ex[0], triv[0]
    return LyapunovResult(
        ex, triv, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long), horizon, settings
    )


def map_samples(fn: Callable, X0: Tensor, C: Optional[Tensor] = None, *, group=None):
    """Sample-parallel map for any per-sample analysis: ``fn(X_shard [b, S, D], C_shard, start)`` on each rank's
    contiguous shard of the batch X0 [B, S, D] (``start`` = the global index of its first sample, for seeds), with
    the outputs gathered on every rank in input order.

    ``fn`` returns a tensor with a leading sample dimension (or a tuple / dict of such tensors); outputs are
    concatenated along that dimension. A rank with no samples does not call ``fn`` but takes part in the gather.
    C is None, [S, D] (shared) or [B, S, D] (sharded with X0).

    Example (under torchrun, with a process group):
        >>> sn = map_samples(lambda X, C, s: fj.spectral_norm(m, X, C=C), X0, C)  # doctest: +SKIP
    """
    group = _comm.resolve_group(group, what="group")
    r, P = _comm.rank_and_size(group)
    if X0.dim() != 3:
        raise ValueError(f"X0: map_samples expects a batch [B, S, D], got shape {tuple(X0.shape)}")
    lo, hi = shard_bounds(X0.shape[0], P, r)
    local = None
    if hi > lo:
        Cs = C if C is None or C.dim() == 2 else C[lo:hi]
        out = fn(X0[lo:hi], Cs, lo)
        local = _map_struct(out, lambda t: t.detach().cpu() if isinstance(t, Tensor) else t)
    got = [g for g in _comm.gather_objects(local, group) if g is not None]
    return _cat_struct(got, X0.device)


def _map_struct(o, f):
    if isinstance(o, dict):
        return {key: _map_struct(v, f) for key, v in o.items()}
    if isinstance(o, (tuple, list)):
        return type(o)(_map_struct(v, f) for v in o)
    return f(o)


def _cat_struct(parts: list, device):
    first = parts[0]
    if isinstance(first, dict):
        return {key: _cat_struct([p[key] for p in parts], device) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_struct([p[i] for p in parts], device) for i in range(len(first)))
    if isinstance(first, Tensor):
        return torch.cat([p.reshape(-1) if p.dim() == 0 else p for p in parts]).to(device)
    return parts


__all__ = [
    "lyapunov_spectrum_parallel",
    "finite_time_lyapunov_parallel",
    "map_samples",
    "MODES",
    "STATS",
    "register_token_linearizer",
    "reset_stats",
    "shard_bounds",
]
