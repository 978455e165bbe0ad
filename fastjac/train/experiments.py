"""The trained-model experiments behind examples/fig3_*, fig4_*, fig5_*: named runs at CPU scale, trained once
(in parallel subprocesses of ``python -m fastjac train``) into a shared folder and reused by every figure.

    results = ensure_runs(["original", "spec"], root="examples/out/runs")   # {name: results.json dict}

A finished run (its results.json exists) is never retrained; an interrupted one resumes from its checkpoint.
The figure setting is the CPU preset (4x4 Sudoku, ItrSA, D = 32, H = 4, T = 16) with ``epochs`` = 8 (1000
optimizer steps) so that the whole sweep fits in tens of minutes on 2 cores; ``quick`` = 1 epoch of 2000 boards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

#: name -> (label, CLI flags on top of the CPU preset)
RUNS: Dict[str, tuple] = {
    "original": ("Original", []),
    "spec": ("Spec (1e-3)", ["--spec", "1e-3"]),
    "e_single": ("E-single (1e-3)", ["--e-single", "1e-3"]),
    "e_multi": ("E-multi (1e-3, orthogonal W^V, W^O)", ["--e-multi", "1e-3"]),
    "lyap_0.1": ("Lyapunov, target 0.1", ["--lyap", "1.0", "--lyap-target", "0.1", "--reg-samples", "4",
                                          "--lyap-k", "2", "--reg-every", "2"]),
    "lyap_-0.5": ("Lyapunov, target -0.5", ["--lyap", "1.0", "--lyap-target", "-0.5", "--reg-samples", "4",
                                            "--lyap-k", "2", "--reg-every", "2"]),
    "jac_frob": ("Jacobian Frobenius (1e-3)", ["--jac-frob", "1e-3"]),
    "jac_spec": ("Jacobian spectral (1e-2)", ["--jac-spec", "1e-2"]),
}

FIG_FLAGS = ["--epochs", "8"]
QUICK_FLAGS = ["--epochs", "1", "--n-train", "2000", "--n-test", "200", "--lyap-samples", "1"]


def ensure_runs(names: Sequence[str], root: str, *, quick: bool = False, jobs: int = 2, seed: int = 0,
                threads: int = 1) -> Dict[str, dict]:
    """Train the named runs that have no results.json yet (``jobs`` at a time), then return all their results."""
    for n in names:
        if n not in RUNS:
            raise ValueError(f"names: unknown run {n!r}; expected some of {sorted(RUNS)}")
    root = os.path.join(root, "quick" if quick else "fig")
    todo = [n for n in names if not os.path.exists(os.path.join(root, n, "results.json"))]
    procs: List[tuple] = []
    while todo or procs:
        while todo and len(procs) < jobs:
            n = todo.pop(0)
            out = os.path.join(root, n)
            os.makedirs(out, exist_ok=True)
            cmd = [sys.executable, "-m", "fastjac", "train", "--preset", "cpu", "--quiet", "--out", out,
                   "--seed", str(seed), "--threads", str(threads)] + (QUICK_FLAGS if quick else FIG_FLAGS) + RUNS[n][1]
            log = open(os.path.join(out, "stdout.txt"), "a")
            print(f"[runs] training {n}: {' '.join(cmd[2:])}", flush=True)
            procs.append((n, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
        time.sleep(2)
        for item in list(procs):
            n, p, log, t0 = item
            if p.poll() is not None:
                log.close()
                procs.remove(item)
                if p.returncode != 0:
                    raise RuntimeError(f"run {n} failed (rc={p.returncode}); see {os.path.join(root, n, 'stdout.txt')}")
                print(f"[runs] {n} done in {time.time() - t0:.0f} s", flush=True)
    return {n: load_results(os.path.join(root, n)) for n in names}


def load_results(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    res["dir"] = run_dir
    return res


def accuracy_vs_steps(run_dir: str, steps=(1, 2, 4, 8, 16, 32, 64, 128), n: Optional[int] = None) -> Dict:
    """Board/cell accuracy of a finished run at each number of recurrent steps T (test-time scaling)."""
    from .loop import TrainConfig, evaluate, load_data, load_net

    res = load_results(run_dir)
    cfg = TrainConfig(**{k: (tuple(v) if k == "eval_steps" else v) for k, v in res["config"].items()})
    cfg.progress = False
    data = load_data(cfg)
    if n:
        data = {k: (p[:n], s[:n]) for k, (p, s) in data.items()}
    net = load_net(os.path.join(run_dir, "sudoku_net.safetensors"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return evaluate(net, data, steps=steps)


__all__ = ["RUNS", "ensure_runs", "load_results", "accuracy_vs_steps"]
