"""The jacobian job: the dense step Jacobian of the default (or a given) model, its spectral radius, and its time
against torch.func.jacrev."""

from __future__ import annotations

import time

import torch

from .common import JACREV_AUTO_MAX_N, make_model_and_state

JACREV_CHUNK_BYTES = 1 << 30


def _timed(fn, repeat: int):
    """fn() once to warm up, then ``repeat`` timed calls: (result, median seconds, min, max)."""
    out = fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return out, ts[len(ts) // 2], ts[0], ts[-1]


def run_jacobian(args) -> dict:
    from .. import api
    from ..analysis.spectra import eigvals

    model, X0, C = make_model_and_state(args)
    S, n = X0.shape[0], X0.numel()
    J, t_fast, t_min, t_max = _timed(lambda: api.jacobian(model, X0, C=C, backend=args.backend), args.repeat)
    gb = J.numel() * J.element_size() / 1e9
    # the spectral radius: dense eig is O(n^3) (about 75 s at n = 5184 on 2 cores); Arnoldi on JVPs agrees to ~1e-9
    t0 = time.perf_counter()
    if n <= 1024:
        rho, how = torch.linalg.eigvals(J).abs().max().item(), "dense eig"
    else:
        rho = eigvals(model, X0, C=C, k=8, method="arnoldi", tol=1e-10, seed=0).abs().max().item()
        how = "Arnoldi, 8 eigenvalues"
    t_rho = time.perf_counter() - t0
    out = dict(
        S=S,
        D=model.dim,
        shape=list(J.shape),
        gb=gb,
        spectral_radius=rho,
        spectral_radius_method=how,
        time_fastjac_s=t_fast,
        time_fastjac_min_s=t_min,
        time_fastjac_max_s=t_max,
        repeat=args.repeat,
        time_spectral_radius_s=t_rho,
    )
    print(
        f"model: {model}\ndense step Jacobian [{n}, {n}] ({gb:.3f} GB): spectral radius {rho:.6f} ({how}, "
        f"{t_rho:.1f} s)\nfastjac {t_fast * 1e3:.1f} ms (median of {args.repeat} warmed runs, "
        f"{t_min * 1e3:.1f}-{t_max * 1e3:.1f} ms)"
    )
    run_ref = args.reference == "always" or (args.reference == "auto" and n <= JACREV_AUTO_MAX_N)
    if not run_ref:
        why = (
            "--reference never"
            if args.reference == "never"
            else (
                f"S*D = {n} > {JACREV_AUTO_MAX_N}: jacrev's cost grows like S^2 * S*D (about "
                f"{40 * (S / 81) ** 2 * (n / 5184) / 60:.0f} min on 2 cores); --reference always runs it"
            )
        )
        print(f"torch.func.jacrev reference skipped ({why})")
        out.update(time_jacrev_s=None, speedup=None, max_rel_err=None)
        return out
    heads = getattr(model, "heads", 1)
    per_row = 4 * heads * S * S * X0.element_size() + 8 * n * X0.element_size()
    chunk = max(1, min(n, JACREV_CHUNK_BYTES // per_row))  # bounded memory (unchunked it needs n x that)
    t0 = time.perf_counter()
    with torch.no_grad():
        Jref = torch.func.jacrev(lambda x: model(x, C), chunk_size=chunk)(X0).reshape(n, n)
    t_ref = time.perf_counter() - t0
    err = ((J - Jref).abs().max() / Jref.abs().max()).item()
    out.update(time_jacrev_s=t_ref, jacrev_chunk_size=chunk, speedup=t_ref / t_fast, max_rel_err=err)
    print(
        f"torch.func.jacrev {t_ref * 1e3:.1f} ms (one run, chunk_size={chunk}): {t_ref / t_fast:.1f}x slower "
        f"than fastjac's median (max relative difference {err:.1e})"
    )
    return out
