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
(``fastjac.distributed.engine``). See docs/distributed.md for launching, costs and when each mode pays.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from . import _comm
from ._comm import reset_stats, shard_bounds, STATS

MODES = ("samples", "tokens")


def _check_mode(parallel: str) -> None:
    if parallel not in MODES:
        raise ValueError(f"parallel: expected None, 'samples' or 'tokens', got {parallel!r}")


def _orthonormalize(V: Tensor, qr_backend: str):
    """QR of tangents V [k, B, S, D] per sample (as lyapunov.py does): (Q [k, B, S, D], logd [B, k])."""
    from ..ops.qr import qr

    k, B = V.shape[:2]
    n = V[0, 0].numel()
    Q = torch.empty_like(V)
    out = Q.view(k, B, n).permute(1, 2, 0)
    _, logd = qr(V.reshape(k, B, n).permute(1, 2, 0), backend=qr_backend, out=out)
    return Q, logd


def _validate(step, X0, C, k, steps, burn_in, renorm_every, history_every, checkpoint_every, project_radial,
              seed=0, trivial_below=None, qr_backend="auto"):
    # the single-process run's checks, so both refuse the same inputs with the same messages
    from ..analysis.lyapunov import validate_run

    v = validate_run(step, X0, C, k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
                     history_every=history_every, checkpoint_every=checkpoint_every, project_radial=project_radial,
                     seed=seed, trivial_below=trivial_below, qr_backend=qr_backend, checkpoint=None)
    return (v["X"], v["C3"], v["batched"], v["k"], v["steps"], v["burn_in"], v["renorm_every"], v["history_every"],
            v["checkpoint_every"], v["n_triv"])


def _result(sums: Tensor, hist: list, hist_steps: list, n: int, n_triv: int, project_radial: bool, dtype,
            trivial_below, batched: bool, steps: int, settings: Dict[str, Any]):
    from ..analysis.lyapunov import LyapunovResult, _trivial_mask

    ex = sums / steps
    order = torch.argsort(ex, dim=-1, descending=True)
    ex = ex.gather(-1, order)
    H = torch.stack(hist).to(ex.device)
    H = H.gather(-1, order.unsqueeze(0).expand(len(hist), -1, -1))
    triv = _trivial_mask(ex, n, 0 if project_radial else n_triv, dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    hsteps = torch.tensor(hist_steps)
    if not batched:
        ex, triv, H = ex[0], triv[0], H[:, 0]
    return LyapunovResult(ex, triv, H.cpu(), hsteps, steps, settings)


def lyapunov_spectrum_parallel(step, X0: Tensor, *, C: Optional[Tensor] = None, k: Optional[int] = None, steps: int,
                               burn_in: int = 0, renorm_every: int = 1, project_radial: bool = False,
                               backend: str = "auto", qr_backend: str = "auto", seed: int = 0,
                               history_every: int = 1, checkpoint: Optional[str] = None,
                               checkpoint_every: int = 100, progress: bool = True,
                               trivial_below: Optional[float] = None, parallel: str = "samples", group=None):
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
    _check_mode(parallel)
    group = _comm.resolve_group(group, what="parallel")
    r, P = _comm.rank_and_size(group)
    X, C3, batched, k, steps, burn_in, renorm_every, history_every, checkpoint_every, n_triv = _validate(
        step, X0, C, k, steps, burn_in, renorm_every, history_every, checkpoint_every, project_radial,
        seed=seed, trivial_below=trivial_below, qr_backend=qr_backend)
    B, S, D = X.shape
    settings = dict(method="benettin", k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
                    project_radial=project_radial, backend=backend, qr_backend=qr_backend, seed=seed,
                    history_every=history_every, dtype=str(X.dtype), shape=list(X0.shape),
                    step=type(step).__name__, parallel=parallel, world_size=P)
    ckpt = None
    if checkpoint:
        from ..analysis.lyapunov import fingerprint
        from .engine import ShardCheckpoint

        ckpt = ShardCheckpoint(checkpoint, group, fingerprint(step, X0, C, settings), parallel, X.device)
    common = dict(k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every, project_radial=project_radial,
                  history_every=history_every, ckpt=ckpt, checkpoint_every=checkpoint_every,
                  progress=progress and r == 0)
    if parallel == "samples":
        from .samples import run_samples

        sums, hist, hist_steps = run_samples(step, X, C3, group, backend=backend, qr_backend=qr_backend, seed=seed,
                                             **common)
    else:
        from .tokens import run_tokens

        sums, hist, hist_steps = run_tokens(step, X, C3, group, backend=backend, qr_backend=qr_backend, seed=seed,
                                            **common)
    return _result(sums, hist, hist_steps, S * D, n_triv, project_radial, X.dtype, trivial_below, batched, steps,
                   settings)


def finite_time_lyapunov_parallel(step, X0: Tensor, *, C: Optional[Tensor] = None, horizon: int = 16,
                                  k: Optional[int] = None, method: str = "auto", dense_max: int = 1024,
                                  backend: str = "auto", tol: float = 1e-8, maxiter: int = 300, seed: int = 0,
                                  trivial_below: Optional[float] = None, parallel: str = "samples", group=None):
    """:func:`fastjac.finite_time_lyapunov` with the batch X0 [B, S, D] sharded over the ranks (``parallel="samples"``).

    The dense method is seed-free: the result equals a single-process batched run. The matrix-free method seeds
    sample b's solver with ``seed + b`` (its global index), so results do not depend on the number of ranks (a
    single-process batched run instead draws all samples from one generator seeded ``seed``: its matrix-free
    results differ from these at the solver's tolerance). ``parallel="tokens"`` is refused: the matrix-free SVD
    needs VJPs, which the token-parallel linearisation does not provide.
    """
    from ..analysis.lyapunov import LyapunovResult, finite_time_lyapunov
    from ..linearization import prepare

    _check_mode(parallel)
    if parallel == "tokens":
        raise ValueError("parallel: finite_time_lyapunov supports 'samples' only (its dense product and its "
                         "matrix-free SVD need the whole state and VJPs); use lyapunov_spectrum(parallel='tokens')")
    group = _comm.resolve_group(group, what="parallel")
    r, P = _comm.rank_and_size(group)
    X, C3, batched = prepare(step, X0, C, name="X0")
    B, S, D = X.shape
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'matrix_free', got {method!r}")
    resolved = ("dense" if S * D <= dense_max else "matrix_free") if method == "auto" else method
    lo, hi = shard_bounds(B, P, r)
    kw = dict(horizon=horizon, k=k, method=resolved, dense_max=dense_max, backend=backend, tol=tol, maxiter=maxiter,
              trivial_below=trivial_below)
    Cs = lambda a, b: C3 if C3 is None or C3.dim() == 2 else C3[a:b]  # noqa: E731
    local = None
    if hi > lo:
        if resolved == "dense":
            res = finite_time_lyapunov(step, X[lo:hi], C=Cs(lo, hi), seed=seed, **kw)
            local = (res.exponents.cpu(), res.trivial.cpu(), res.settings)
        else:
            parts = [finite_time_lyapunov(step, X[b:b + 1], C=Cs(b, b + 1), seed=seed + b, **kw)
                     for b in range(lo, hi)]
            local = (torch.cat([p.exponents for p in parts]).cpu(), torch.cat([p.trivial for p in parts]).cpu(),
                     parts[0].settings)
    got = [g for g in _comm.gather_objects(local, group) if g is not None]
    ex = torch.cat([g[0] for g in got]).to(X.device)
    triv = torch.cat([g[1] for g in got]).to(X.device)
    settings = dict(got[0][2], shape=list(X0.shape), parallel="samples", world_size=P)
    if not batched:
        ex, triv = ex[0], triv[0]
    return LyapunovResult(ex, triv, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long), horizon,
                          settings)


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


__all__ = ["lyapunov_spectrum_parallel", "finite_time_lyapunov_parallel", "map_samples", "MODES", "STATS",
           "reset_stats", "shard_bounds"]
