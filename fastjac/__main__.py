"""fastjac's main job: ``python -m fastjac`` (or the ``fastjac`` command).

    python -m fastjac                        # Lyapunov spectrum of a default ItrSA model: JSON + PNG in fastjac_out/
    python -m fastjac lyapunov --steps 2000 --k 64 --model my_model.safetensors --out runs/a
    python -m fastjac jacobian               # dense step Jacobian: size, spectral radius, time vs torch.func (~1 min)
    python -m fastjac aot | train | build    # GPU compile check, training, compiled extension (--help each)

The default model is the trained 4x4 Sudoku ItrSA that ships with fastjac (fastjac/train/weights; D = 32, H = 4,
l2 normalisation, float64) on one held-out puzzle: its state X0 and injected input C are what the Sudoku model feeds
its recurrent core (S = 16 tokens). ``--model random`` (or any of --dim/--heads/--norm/--eta/--tokens) uses a freshly
initialised ItrSA instead, the paper's setting at CPU scale (D = 64, H = 4, l2, S = 81 tokens, a random C).
A run saves a checkpoint in its output folder; Ctrl-C and the same command again resumes it (``--fresh`` starts
over).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


# model options of the default model; given beside --model they would be ignored, so they are refused
MODEL_OPTS = {"dim": 64, "heads": 4, "norm": "l2", "eta": 1.0}


def _fill_model_defaults(args) -> None:
    """Record which model options were given, then fill the defaults in (once; idempotent)."""
    if hasattr(args, "_model_opts_given"):
        return
    args._model_opts_given = [k for k in MODEL_OPTS if getattr(args, k, None) is not None]
    for k, v in MODEL_OPTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def _default_model(args):
    from .models import ItrSA

    torch.manual_seed(args.seed)
    return ItrSA(args.dim, args.heads, norm=args.norm, eta=args.eta, dtype=torch.float64)


def _load_model(path: str, allow_pickle: bool = False):
    """A model saved with ``fastjac.save_model`` (safetensors + JSON: no code in the file runs), or, only with
    ``--allow-pickle``, one saved whole with ``torch.save(model, path)`` (a pickle runs code: trusted files only)."""
    from .models import load_model

    try:
        return load_model(path, allow_pickle=allow_pickle)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--model: {str(e).split(': ', 1)[-1]}") from None


def _state(model, args):
    g = torch.Generator().manual_seed(args.seed + 1)
    X0 = torch.randn(args.tokens, model.dim, generator=g, dtype=torch.float64).to(model.wq.dtype)
    C = torch.randn(args.tokens, model.dim, generator=g, dtype=torch.float64).to(model.wq.dtype)
    if hasattr(model, "project"):
        X0 = model.project(X0)
    return X0, C


def make_model_and_state(args, allow_trained: bool = True):
    """The job's model and its (X0 [S, D], C [S, D]) from the parsed arguments (shared with fastjac.distributed).

    Without --model and without any model or state option, the shipped trained model on its puzzle (when
    ``allow_trained``); ``--model random`` or any such option, a fresh ItrSA; ``--model FILE``, that file."""
    tokens_given = getattr(args, "tokens", None) is not None
    _fill_model_defaults(args)
    if not tokens_given:
        args.tokens = 81
    if args.model is None and allow_trained and not args._model_opts_given and not tokens_given:
        from .train.pretrained import load_default

        model, X0, C = load_default()
        args.tokens = X0.shape[0]
        return model, X0, C
    if args.model == "random":
        args.model = None
    if args.model:
        if args._model_opts_given:
            given = ", ".join(f"--{k}" for k in args._model_opts_given)
            raise ValueError(f"--model: {given} would be ignored beside --model (the file fixes the model); drop "
                             f"{'it' if len(args._model_opts_given) == 1 else 'them'}")
        model = _load_model(args.model, getattr(args, "allow_pickle", False))
    else:
        model = _default_model(args)
    X0, C = _state(model, args)
    return model, X0, C


def _check_out_dir(out: str) -> None:
    """Create the output folder and prove it writable before any compute (a late failure would lose the run)."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".fastjac_write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out: cannot write to {out!r} ({e.strerror or e}); pass a writable folder with --out")


def _write_json(path: str, obj: dict, what: str) -> str:
    """Write strict JSON to path; on failure to a fallback file in the temp folder, else to stdout. Returns where."""
    from ._checks import json_safe

    text = json.dumps(json_safe(obj), indent=1, allow_nan=False)
    try:
        with open(path, "w") as f:
            f.write(text)
        return path
    except OSError as e:
        import tempfile

        fallback = os.path.join(tempfile.gettempdir(), f"fastjac_{what}_{os.getpid()}_{int(time.time())}.json")
        print(f"fastjac: could not write {path!r} ({e.strerror or e})", file=sys.stderr)
        try:
            with open(fallback, "w") as f:
                f.write(text)
            print(f"fastjac: the results are in {fallback} instead", file=sys.stderr)
            return fallback
        except OSError:
            print("fastjac: nor the fallback file; the results follow on stdout", file=sys.stderr)
            print(text)
            return "<stdout>"


def run_lyapunov(args) -> dict:
    from .analysis.lyapunov import lyapunov_spectrum

    model, X0, C = make_model_and_state(args)
    _check_out_dir(args.out)
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
    # results first: printed, then the JSON (with a fallback), then the plot; a failed write loses nothing
    print(f"lambda_max = {res.max.item():+.5f}   mean of the {int((~res.trivial).sum())} non-trivial exponents = "
          f"{res.mean.item():+.5f} nats per step   ({int(res.trivial.sum())} trivial)")
    js = _write_json(os.path.join(args.out, "lyapunov.json"), out, "lyapunov")
    png = os.path.join(args.out, "lyapunov.png")
    try:
        from .plot.lyapunov import plot_lyapunov

        plot_lyapunov(res, png)
    except ImportError:
        png = None
        print("matplotlib is not installed: no plot (pip install 'fastjac[plot]')")
    except (OSError, RuntimeError, ValueError) as e:
        png = None
        print(f"fastjac: could not write the plot ({e}); the JSON has every number", file=sys.stderr)
    print(f"wrote {js}" + (f" and {png}" if png else "") + f" in {dt:.1f} s")
    return out


# jacrev's reference runs by default up to this S*D (about 40 s at the default 81 x 64 on 2 cores; its cost grows
# like S^2 * S*D, so S*D = 16000 would take the better part of an hour)
JACREV_AUTO_MAX_N = 8192
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
    from . import api
    from .analysis.spectra import eigvals

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
    out = dict(S=S, D=model.dim, shape=list(J.shape), gb=gb, spectral_radius=rho, spectral_radius_method=how,
               time_fastjac_s=t_fast, time_fastjac_min_s=t_min, time_fastjac_max_s=t_max, repeat=args.repeat,
               time_spectral_radius_s=t_rho)
    print(f"model: {model}\ndense step Jacobian [{n}, {n}] ({gb:.3f} GB): spectral radius {rho:.6f} ({how}, "
          f"{t_rho:.1f} s)\nfastjac {t_fast * 1e3:.1f} ms (median of {args.repeat} warmed runs, "
          f"{t_min * 1e3:.1f}-{t_max * 1e3:.1f} ms)")
    run_ref = args.reference == "always" or (args.reference == "auto" and n <= JACREV_AUTO_MAX_N)
    if not run_ref:
        why = "--reference never" if args.reference == "never" else (
            f"S*D = {n} > {JACREV_AUTO_MAX_N}: jacrev's cost grows like S^2 * S*D (about "
            f"{40 * (S / 81) ** 2 * (n / 5184) / 60:.0f} min on 2 cores); --reference always runs it")
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
    print(f"torch.func.jacrev {t_ref * 1e3:.1f} ms (one run, chunk_size={chunk}): {t_ref / t_fast:.1f}x slower "
          f"than fastjac's median (max relative difference {err:.1e})")
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


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {v}")
        return v
    return parse


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The main job's argument parser (the sharded job of fastjac.distributed reuses it)."""
    ap = argparse.ArgumentParser(prog="fastjac", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", nargs="?", default="lyapunov", choices=("lyapunov", "jacobian"))
    ap.add_argument("--model", help="a model saved with fastjac.save_model(model, path), or 'random' for a fresh "
                    "ItrSA (default: the shipped trained 4x4 Sudoku ItrSA on a held-out puzzle, unless a model or "
                    "state option is given); --dim/--heads/--norm/--eta do not apply to a file")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="let --model load a torch.save(model, path) pickle: unpickling runs code from the file, "
                         "so only for files you made")
    ap.add_argument("--dim", type=_int_at_least(1), default=None, help="default model: features D (64)")
    ap.add_argument("--heads", type=_int_at_least(1), default=None, help="default model: heads H (4)")
    ap.add_argument("--tokens", type=_int_at_least(1), default=None,
                    help="tokens S of the random model's state (default 81; the trained default uses its puzzle's 16)")
    ap.add_argument("--norm", default=None, choices=("l2", "rms", "layer", "none"), help="default model (l2)")
    ap.add_argument("--eta", type=_finite_float, default=None, help="default model: step size eta (1.0)")
    ap.add_argument("--k", type=_int_at_least(1), default=32, help="tangents (leading exponents)")
    ap.add_argument("--steps", type=_int_at_least(1), default=500)
    ap.add_argument("--burn-in", type=_int_at_least(0), default=50)
    ap.add_argument("--seed", type=_int_at_least(0), default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="fastjac_out", help="output folder (JSON, PNG, checkpoint)")
    ap.add_argument("--checkpoint-every", type=_int_at_least(1), default=50)
    ap.add_argument("--repeat", type=_int_at_least(1), default=3, help="jacobian: timed runs after a warm-up")
    ap.add_argument("--reference", choices=("auto", "always", "never"), default="auto",
                    help=f"jacobian: time torch.func.jacrev too (auto: when S*D <= {JACREV_AUTO_MAX_N})")
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
    _fill_model_defaults(args)
    if args.parallel is not None:
        from .distributed.cli import run_parallel

        return int(run_parallel(args) or 0)
    try:
        (run_lyapunov if args.job == "lyapunov" else run_jacobian)(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ArithmeticError) as e:
        print(f"fastjac: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
