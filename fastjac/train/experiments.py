"""The trained-model experiments behind examples/fig3_*, fig4_*, fig5_* and examples/sudoku6.py: seed sweeps of
:mod:`fastjac.train.sweep` (one home for training, resuming and evaluating runs), one grid per figure.

    summary = run_figure("fig5", seeds=range(5), root="runs/sweep", out_dir="examples/out")   # the sweep's JSON
    results = ensure_runs(["original", "spec_1e-4"], root="runs/sweep", seed=0)            # {name: results.json}

A finished run (its DONE marker) is never retrained; an interrupted one resumes from its checkpoint. Every run is
the CPU preset (4x4 Sudoku, ItrSA or AKOrN, D = 32, H = 4, T = 16, 20 epochs = 2500 steps; the 6x6 grid: preset
``cpu6``), evaluated on the sweep's common held-out test set. ``quick=True``: 1 epoch of 2000 boards per run.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Optional, Sequence

from . import sweep as _sweep

#: figure -> (grids of fastjac.train.sweep.GRIDS, default seeds)
FIGURES: Dict[str, tuple] = {
    "fig3": (["fig3"], (0, 1, 2)),
    "fig4": (["fig4"], (0, 1, 2, 3, 4)),
    "fig5": (["fig5"], (0, 1, 2, 3, 4)),
    "sudoku6": (["sudoku6"], (0, 1, 2)),
}

#: name -> (label, preset, flags): the sweep's configurations
RUNS = _sweep.CONFIGS


def run_figure(
    fig: str,
    *,
    seeds: Optional[Iterable[int]] = None,
    root: str = "runs/sweep",
    jobs: int = 2,
    threads: int = 1,
    quick: bool = False,
    out_dir: str = "examples/out",
    train: bool = True,
    extra_configs: Sequence[str] = (),
) -> dict:
    """Train (unless ``train=False``) and evaluate the runs of figure ``fig``; writes ``out_dir/<fig>_sweep.json``
    and the PNGs, and returns the summary (see :func:`fastjac.train.sweep.sweep`)."""
    if fig not in FIGURES:
        raise ValueError(f"fig: expected one of {sorted(FIGURES)}, got {fig!r}")
    grids, default_seeds = FIGURES[fig]
    configs = list(dict.fromkeys([n for g in grids for n in _sweep.GRIDS[g]] + list(extra_configs)))
    seeds = sorted(set(int(s) for s in (default_seeds if seeds is None else seeds)))
    root = os.path.join(root, "quick") if quick else root
    return _sweep.sweep(
        configs,
        seeds,
        root=root,
        jobs=jobs,
        threads=threads,
        train=train,
        out=os.path.join(out_dir, f"{fig}_sweep.json"),
        png_dir=out_dir,
        extra=_sweep.QUICK_FLAGS if quick else (),
        n_test=200 if quick else 500,
    )


def figure_main(fig: str, doc: str, argv: Optional[Sequence[str]] = None) -> dict:
    """The command line of an example script: ``--seeds``, ``--root``, ``--jobs``, ``--quick``, ``--no-train``,
    ``--out``; prints one line per configuration (mean +- sd over seeds) and returns the summary."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {FIGURES[fig][1]}")
    p.add_argument("--root", default="runs/sweep", help="run folders (shared by all figures; default runs/sweep)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 epoch of 2000 boards per run")
    p.add_argument("--no-train", action="store_true", help="evaluate the finished runs only")
    p.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "out"
        ),
        help="folder of the JSON and PNGs (default examples/out)",
    )
    a = p.parse_args(argv)
    s = run_figure(fig, seeds=a.seeds, root=a.root, jobs=a.jobs, quick=a.quick, out_dir=a.out, train=not a.no_train)
    for agg in s["configs"].values():
        st = agg["stats"]

        def f(k, st=st):
            v = st.get(k, {})
            return "-" if v.get("mean") is None else f"{v['mean']:.3f} +- {(v.get('sd') or 0):.3f}"

        print(
            f"{agg['label']:34s} n={len(agg['seeds'])}  ID board {f('test_id/T16/board')}  OOD board "
            f"{f('test_ood/T16/board')}  lambda_max {f('lambda_max')}"
        )
    print(
        f"{s['status']['finished']} runs finished, {len(s['status']['unfinished'])} not; "
        f"{os.path.join(a.out, fig + '_sweep.json')}, figures: {', '.join(s.get('figures', []))}"
    )
    return s


def ensure_runs(
    names: Sequence[str], root: str, *, quick: bool = False, jobs: int = 2, seed: int = 0, threads: int = 1
) -> Dict[str, dict]:
    """Train the named runs (one seed) that have not finished, ``jobs`` at a time; return their results.json."""
    for n in names:
        if n not in RUNS:
            raise ValueError(f"names: unknown run {n!r}; expected some of {sorted(RUNS)}")
    root = os.path.join(root, "quick") if quick else root
    st = _sweep.train_runs(
        [(n, seed) for n in names],
        root,
        jobs=jobs,
        threads=threads,
        extra=_sweep.QUICK_FLAGS if quick else (),
        progress=False,
    )
    bad = [k for k, v in st.items() if v != "finished"]
    if bad:
        raise RuntimeError(f"runs {bad} did not finish; see their stdout.txt under {root}")
    return {n: load_results(_sweep.run_dir(root, n, seed)) for n in names}


def load_results(run_dir: str) -> dict:
    """A run's results.json, with its folder as "dir"."""
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    res["dir"] = run_dir
    return res


__all__ = ["FIGURES", "RUNS", "run_figure", "figure_main", "ensure_runs", "load_results"]
