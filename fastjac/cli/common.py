"""What every command-line job shares: the argument parser, the model and state set-up, and argument checks.

The output folder check and the strict JSON writer are ``fastjac._io`` (one writer for every job).
"""

from __future__ import annotations

import argparse
import os

import torch

# model options of the random model; given beside --model they would be ignored, so they are refused
MODEL_OPTS = {"dim": 64, "heads": 4, "norm": "l2", "eta": 1.0}
# the random model's tokens (the paper's setting at CPU scale: a 9 x 9 board)
RANDOM_TOKENS = 81

DESCRIPTION = """fastjac's command-line jobs: ``python -m fastjac [JOB] [options]`` (or the ``fastjac`` command).

    python -m fastjac                        # Lyapunov spectrum of the default model: JSON + PNG in fastjac_out/
    python -m fastjac lyapunov --steps 2000 --k 64 --tol 0.005 --model my_model.safetensors --out runs/a
    python -m fastjac jacobian               # dense step Jacobian: size, spectral radius, time vs torch.func (~1 min)
    torchrun --nproc_per_node=2 -m fastjac --parallel tokens   # the Lyapunov job sharded (fastjac.distributed)
    python -m fastjac aot | train | build | sweep    # GPU compile check, training, C++ extension, figure runs (--help)

The default model is the trained 4x4 Sudoku ItrSA that ships with fastjac (fastjac/train/weights; D = 32, H = 4,
l2 normalisation, float64) on one held-out puzzle: its state X0 and injected input C are what the Sudoku model feeds
its recurrent core (S = 16 tokens). ``--model random`` (or any of --dim/--heads/--norm/--eta/--tokens) uses a freshly
initialised ItrSA instead, the paper's setting at CPU scale (D = 64, H = 4, l2, S = 81 tokens, a random C).
A run saves a checkpoint in its output folder; Ctrl-C and the same command again resumes it (``--fresh`` starts
over). Every exponent is printed and written with its standard error (batch means; see fastjac.analysis.benettin).
"""


def fill_model_defaults(args) -> None:
    """Record which model options were given, then fill the defaults in (once; idempotent)."""
    if hasattr(args, "_model_opts_given"):
        return
    args._model_opts_given = [k for k in MODEL_OPTS if getattr(args, k, None) is not None]
    for k, v in MODEL_OPTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def random_model(args):
    from ..models import ItrSA, check_model_size

    torch.manual_seed(args.seed)
    # the size is checked from the options alone, before anything is allocated (--dim 30000: 28.8 GB, refused)
    check_model_size(args.dim, args.heads, norm=args.norm, dtype=torch.float64)
    return ItrSA(args.dim, args.heads, norm=args.norm, eta=args.eta, dtype=torch.float64)


def load_model_file(path: str, allow_pickle: bool = False):
    """A model saved with ``fastjac.save_model`` (safetensors + JSON: no code in the file runs), or, only with
    ``--allow-pickle``, one saved whole with ``torch.save(model, path)`` (a pickle runs code: trusted files only)."""
    from ..models import load_model

    try:
        return load_model(path, allow_pickle=allow_pickle)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--model: {str(e).split(': ', 1)[-1]}") from None


def random_state(model, args):
    """(X0 [S, D], C [S, D]) drawn with ``--seed`` + 1 (S = ``--tokens``)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    X0 = torch.randn(args.tokens, model.dim, generator=g, dtype=torch.float64).to(model.wq.dtype)
    C = torch.randn(args.tokens, model.dim, generator=g, dtype=torch.float64).to(model.wq.dtype)
    if hasattr(model, "project"):
        X0 = model.project(X0)
    return X0, C


def uses_trained_default(args) -> bool:
    """Whether the options leave the job on the shipped trained model (no --model, no model or state option)."""
    return args.model is None and not args._model_opts_given and getattr(args, "tokens", None) is None


def make_model_and_state(args, allow_trained: bool = True):
    """The job's model and its (X0 [S, D], C [S, D]) from the parsed arguments (every job's one set-up).

    Without --model and without any model or state option, the shipped trained model on its puzzle (when
    ``allow_trained``); ``--model random`` or any such option, a fresh ItrSA; ``--model FILE``, that file.
    Sets ``args.tokens`` and ``args.model_kind`` ("trained", "random" or "file")."""
    fill_model_defaults(args)
    trained = uses_trained_default(args) and allow_trained
    if getattr(args, "tokens", None) is None:
        args.tokens = RANDOM_TOKENS
    if trained:
        from ..train.pretrained import load_default

        model, X0, C = load_default()
        args.tokens, args.model_kind = X0.shape[0], "trained"
        return model, X0, C
    if args.model == "random":
        args.model = None
    if args.model:
        if args._model_opts_given:
            given = ", ".join(f"--{k}" for k in args._model_opts_given)
            raise ValueError(
                f"--model: {given} would be ignored beside --model (the file fixes the model); drop "
                f"{'it' if len(args._model_opts_given) == 1 else 'them'}"
            )
        model = load_model_file(args.model, getattr(args, "allow_pickle", False))
        args.model_kind = "file"
    else:
        model = random_model(args)
        args.model_kind = "random"
    X0, C = random_state(model, args)
    return model, X0, C


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An int from the environment variable ``name`` (``default`` when unset); a ValueError naming the variable."""
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        v = int(text.strip())
    except ValueError:
        raise ValueError(f"{name}: expected an int >= {minimum} in the environment variable, got {text!r}") from None
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum} in the environment variable, got {v}")
    return v


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {v}")
        return v

    return parse


def finite_float(text: str, positive: bool = False) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if positive and v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    return finite_float(text, positive=True)


# jacrev's reference runs by default up to this S*D (about 40 s at the default 81 x 64 on 2 cores; its cost grows
# like S^2 * S*D, so S*D = 16000 would take the better part of an hour)
JACREV_AUTO_MAX_N = 8192


def build_parser() -> argparse.ArgumentParser:
    """The parser of the built-in jobs (lyapunov, jacobian; --parallel shards the lyapunov job)."""
    ap = argparse.ArgumentParser(
        prog="fastjac", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("job", nargs="?", default="lyapunov", choices=("lyapunov", "jacobian"))
    ap.add_argument(
        "--model",
        help="a model saved with fastjac.save_model(model, path), or 'random' for a fresh "
        "ItrSA (default: the shipped trained 4x4 Sudoku ItrSA on a held-out puzzle, unless a model or "
        "state option is given); --dim/--heads/--norm/--eta do not apply to a file",
    )
    ap.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let --model load a torch.save(model, path) pickle: unpickling runs code from the file, "
        "so only for files you made",
    )
    ap.add_argument("--dim", type=int_at_least(1), default=None, help="random model: features D (64)")
    ap.add_argument("--heads", type=int_at_least(1), default=None, help="random model: heads H (4)")
    ap.add_argument(
        "--tokens",
        type=int_at_least(1),
        default=None,
        help="tokens S of the random model's state (default 81; the trained default uses its puzzle's 16)",
    )
    ap.add_argument("--norm", default=None, choices=("l2", "rms", "layer", "none"), help="random model (l2)")
    ap.add_argument("--eta", type=finite_float, default=None, help="random model: step size eta (1.0)")
    ap.add_argument("--k", type=int_at_least(1), default=32, help="tangents (leading exponents)")
    ap.add_argument("--steps", type=int_at_least(1), default=500, help="steps after burn-in (the cap with --tol)")
    ap.add_argument("--burn-in", type=int_at_least(0), default=50)
    ap.add_argument(
        "--tol",
        type=positive_float,
        default=None,
        help="stop early once every non-trivial exponent's standard error is below this (nats/step)",
    )
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="fastjac_out", help="output folder (JSON, PNG, checkpoint)")
    ap.add_argument("--checkpoint-every", type=int_at_least(1), default=50)
    ap.add_argument("--repeat", type=int_at_least(1), default=3, help="jacobian: timed runs after a warm-up")
    ap.add_argument(
        "--reference",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"jacobian: time torch.func.jacrev too (auto: when S*D <= {JACREV_AUTO_MAX_N})",
    )
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--parallel",
        choices=("samples", "tokens"),
        default=None,
        help="under torchrun: shard the lyapunov job across ranks by samples or by tokens "
        "(fastjac.distributed); samples: FASTJAC_SAMPLES inputs (default: the world size)",
    )
    return ap


def result_line(res, sample: int = 0) -> str:
    """The printed summary of a Lyapunov result: lambda_max and the mean, each with its standard error."""
    pick = lambda t: t if t.dim() == 0 else t[sample]  # noqa: E731
    mx, mse, mu = float(pick(res.max)), float(pick(res.max_stderr)), float(pick(res.mean))
    triv = res.trivial if not res.batched else res.trivial[sample]
    se = f" +- {mse:.5f}" if mse == mse else " (too few intervals for a standard error)"
    line = (
        f"lambda_max = {mx:+.5f}{se}   mean of the {int((~triv).sum())} non-trivial exponents = {mu:+.5f} "
        f"nats per step   ({int(triv.sum())} trivial; +- one standard error, batch means)"
    )
    s = res.settings
    if s.get("tol") is not None:
        line += f"\n--tol {s['tol']:g}: " + (
            f"every standard error below it after {res.steps} of {s['steps_requested']} steps"
            if s.get("stopped_early")
            else f"not reached in {res.steps} steps (the cap, --steps)"
        )
    return line
