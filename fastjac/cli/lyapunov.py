"""The main job: the Lyapunov spectrum of the default (or a given) model; JSON + PNG in the output folder."""

from __future__ import annotations

import os
import sys
import time

from .._io import check_out_dir, write_json
from .common import make_model_and_state, result_line


def write_outputs(res, out_dir: str, extra: dict, sample: int = 0):
    """Results first (the caller printed them), then the JSON (strict, with a fallback), then the plot: a failed
    write loses nothing. Returns (json path, png path or None)."""
    out = res.to_dict()
    out.update(extra)
    js = write_json(os.path.join(out_dir, "lyapunov.json"), out, "lyapunov")
    png = os.path.join(out_dir, "lyapunov.png")
    try:
        from ..plot.lyapunov import plot_lyapunov

        plot_lyapunov(res, png, sample=sample)
    except ImportError:
        png = None
        print("matplotlib is not installed: no plot (pip install 'fastjac[plot]')")
    except (OSError, RuntimeError, ValueError) as e:
        png = None
        print(f"fastjac: could not write the plot ({e}); the JSON has every number", file=sys.stderr)
    return js, png


def run_lyapunov(args) -> dict:
    from ..analysis.lyapunov import lyapunov_spectrum

    model, X0, C = make_model_and_state(args)
    check_out_dir(args.out)
    ckpt = os.path.join(args.out, "lyapunov.ckpt")
    if args.fresh and os.path.exists(ckpt):
        os.remove(ckpt)
    print(
        f"model ({args.model_kind}): {model}\nstate: S={args.tokens} tokens, D={model.dim}; k={args.k} tangents, "
        f"{args.steps} steps after {args.burn_in} burn-in steps (checkpoint: {ckpt})"
    )
    t0 = time.perf_counter()
    res = lyapunov_spectrum(
        model,
        X0,
        C=C,
        k=args.k,
        steps=args.steps,
        burn_in=args.burn_in,
        seed=args.seed,
        checkpoint=ckpt,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
        backend=args.backend,
        tol=args.tol,
    )
    dt = time.perf_counter() - t0
    print(result_line(res))
    js, png = write_outputs(res, args.out, dict(wall_s_this_run=dt, model=repr(model), model_kind=args.model_kind))
    print(f"wrote {js}" + (f" and {png}" if png else "") + f" in {dt:.1f} s")
    return res.to_dict()
