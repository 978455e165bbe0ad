"""fastjac's main job: ``python -m fastjac`` (or the ``fastjac`` command).

    python -m fastjac                        # Lyapunov spectrum of a default ItrSA model: JSON + PNG in fastjac_out/
    python -m fastjac lyapunov --steps 2000 --k 64 --model my_model.pt --out runs/a
    python -m fastjac jacobian               # dense step Jacobian: size, spectral radius, time vs torch.func
    python -m fastjac aot | train | build    # GPU compile check, training, compiled extension (--help each)

The default model is the paper's setting at CPU scale: ItrSA, l2 (RMS) normalisation, D = 64, H = 4, S = 81 tokens
(the Sudoku sequence length), a random injected input C, float64. A run saves a checkpoint in its output folder;
Ctrl-C and the same command again resumes it (``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _default_model(args):
    from .models import ItrSA

    torch.manual_seed(args.seed)
    return ItrSA(args.dim, args.heads, norm=args.norm, eta=args.eta, dtype=torch.float64)


def _load_model(path: str):
    """A fastjac model saved whole with ``torch.save(model, path)`` (a pickle: load only files you trust)."""
    from .backends import FASTJAC_MODELS

    if not os.path.exists(path):
        raise SystemExit(f"--model: no such file {path!r}")
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, FASTJAC_MODELS):
        raise SystemExit(f"--model: expected a saved fastjac ItrSA or AKOrN (torch.save(model, path)), got "
                         f"{type(model).__name__}")
    return model


def _state(model, args):
    g = torch.Generator().manual_seed(args.seed + 1)
    X0 = torch.randn(args.tokens, model.dim, generator=g, dtype=torch.float64).to(model.wq.dtype)
    C = torch.randn(args.tokens, model.dim, generator=g, dtype=torch.float64).to(model.wq.dtype)
    if hasattr(model, "project"):
        X0 = model.project(X0)
    return X0, C


def make_model_and_state(args):
    """The job's model and its (X0 [S, D], C [S, D]) from the parsed arguments (shared with fastjac.distributed)."""
    model = _load_model(args.model) if args.model else _default_model(args)
    X0, C = _state(model, args)
    return model, X0, C


def run_lyapunov(args) -> dict:
    from .analysis.lyapunov import lyapunov_spectrum

    model, X0, C = make_model_and_state(args)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "lyapunov.ckpt")
    if args.fresh and os.path.exists(ckpt):
        os.remove(ckpt)
    print(f"model: {model}\nstate: S={args.tokens} tokens, D={model.dim}; k={args.k} tangents, {args.steps} steps "
          f"after {args.burn_in} burn-in steps (checkpoint: {ckpt})")
    t0 = time.perf_counter()
    res = lyapunov_spectrum(model, X0, C=C, k=args.k, steps=args.steps, burn_in=args.burn_in, seed=args.seed,
                            checkpoint=ckpt, checkpoint_every=args.checkpoint_every, progress=not args.quiet,
                            backend=args.backend)
    dt = time.perf_counter() - t0
    out = res.to_dict()
    out["wall_s_this_run"] = dt
    out["model"] = repr(model)
    js = os.path.join(args.out, "lyapunov.json")
    with open(js, "w") as f:
        json.dump(out, f, indent=1)
    png = os.path.join(args.out, "lyapunov.png")
    try:
        from .plot.lyapunov import plot_lyapunov

        plot_lyapunov(res, png)
    except ImportError:
        png = None
        print("matplotlib is not installed: no plot (pip install 'fastjac[plot]')")
    print(f"lambda_max = {res.max:+.5f}   mean of the {int((~res.trivial).sum())} non-trivial exponents = "
          f"{res.mean:+.5f}   ({int(res.trivial.sum())} trivial)")
    print(f"wrote {js}" + (f" and {png}" if png else "") + f" in {dt:.1f} s")
    return out


def run_jacobian(args) -> dict:
    from . import api

    model, X0, C = make_model_and_state(args)
    n = X0.numel()
    t0 = time.perf_counter()
    J = api.jacobian(model, X0, C=C, backend=args.backend)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    Jref = torch.func.jacrev(lambda x: model(x, C))(X0).reshape(n, n)
    t_ref = time.perf_counter() - t0
    err = ((J - Jref).abs().max() / Jref.abs().max()).item()
    rho = torch.linalg.eigvals(J).abs().max().item()
    out = dict(S=X0.shape[0], D=model.dim, shape=list(J.shape), gb=J.numel() * J.element_size() / 1e9,
               spectral_radius=rho, time_fastjac_s=t_fast, time_jacrev_s=t_ref, speedup=t_ref / t_fast,
               max_rel_err=err)
    print(f"model: {model}\ndense step Jacobian [{n}, {n}] ({out['gb']:.3f} GB): spectral radius {rho:.5f}\n"
          f"fastjac {t_fast * 1e3:.1f} ms, torch.func.jacrev {t_ref * 1e3:.1f} ms: {t_ref / t_fast:.1f}x faster "
          f"(max relative difference {err:.1e})")
    return out


# Jobs that live with their subsystem: ``python -m fastjac NAME ...`` hands the remaining arguments to
# ``MODULE.main(argv) -> int``. The module is imported only when its job is asked for.
EXTERNAL_JOBS = {
    "aot": ("fastjac.ops._aot", "ahead-of-time GPU compile check of every Triton launch configuration"),
    "train": ("fastjac.train.cli", "regularised training of the Sudoku models"),
    "build": ("fastjac.backends.cpp", "build the compiled C++ extension (backend='cpp') now"),
}


def _external(job: str, argv) -> int:
    import importlib

    mod_name, _ = EXTERNAL_JOBS[job]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        print(f"fastjac {job}: not available in this install ({e})", file=sys.stderr)
        return 2
    return int(mod.main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The main job's argument parser (the sharded job of fastjac.distributed reuses it)."""
    ap = argparse.ArgumentParser(prog="fastjac", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", nargs="?", default="lyapunov", choices=("lyapunov", "jacobian"))
    ap.add_argument("--model", help="a model saved with torch.save(model, path) (default: a fresh ItrSA)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=81)
    ap.add_argument("--norm", default="l2", choices=("l2", "rms", "layer", "none"))
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=32, help="tangents (leading exponents)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--burn-in", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="fastjac_out", help="output folder (JSON, PNG, checkpoint)")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--parallel", choices=("samples", "tokens"), default=None,
                    help="under torchrun: shard the job across ranks by samples or by tokens (fastjac.distributed)")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTERNAL_JOBS:
        return _external(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.parallel is not None:
        from .distributed.cli import run_parallel

        return int(run_parallel(args) or 0)
    try:
        (run_lyapunov if args.job == "lyapunov" else run_jacobian)(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        print(f"fastjac: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
