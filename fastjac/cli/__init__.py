"""fastjac's command-line jobs in one package: ``python -m fastjac [JOB] [options]`` (or the ``fastjac`` command).

Jobs: ``lyapunov`` (the default; ``--parallel samples|tokens`` shards it under torchrun), ``jacobian``, and the
subsystem jobs ``train``, ``build``, ``aot``, ``sweep``, whose ``main(argv)`` lives with their subsystem and is
imported only when asked for. The built-in jobs share one set-up (``fastjac.cli.common``: parser, model and state)
and every job writes JSON through one strict writer (``fastjac._io.write_json``).
"""

from __future__ import annotations

import sys

from .common import build_parser, fill_model_defaults, make_model_and_state  # noqa: F401

# job -> (module with main(argv) -> int, what it does); imported only when its job is asked for
EXTERNAL_JOBS = {
    "aot": ("fastjac.ops._aot", "ahead-of-time GPU compile check of every Triton launch configuration"),
    "train": ("fastjac.train.cli", "regularised training of the Sudoku models"),
    "build": ("fastjac.backends.cpp", "build the compiled C++ extension (backend='cpp') now"),
    "sweep": ("fastjac.train.sweep", "the training runs of a grid of regularisers and seeds, and their tables"),
}


def _external(job: str, argv) -> int:
    import importlib

    mod_name, _ = EXTERNAL_JOBS[job]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        print(f"fastjac {job}: not available in this install ({e})", file=sys.stderr)
        return 2
    if not callable(getattr(mod, "main", None)):
        print(f"fastjac {job}: {mod_name} has no main(argv) in this version", file=sys.stderr)
        return 2
    return int(mod.main(list(argv)) or 0)


def main(argv=None) -> int:
    """Run one job from command-line arguments; returns the exit code (0, 2 for bad input, 130 on Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTERNAL_JOBS:
        return _external(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    fill_model_defaults(args)
    if args.parallel is not None:
        from .parallel import run_parallel

        return int(run_parallel(args) or 0)
    from .jacobian import run_jacobian
    from .lyapunov import run_lyapunov

    try:
        (run_lyapunov if args.job == "lyapunov" else run_jacobian)(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ArithmeticError) as e:
        print(f"fastjac: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "build_parser", "make_model_and_state", "EXTERNAL_JOBS"]
