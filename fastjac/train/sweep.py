"""Seed sweeps of regularised training, evaluated on one common held-out test set: ``python -m fastjac.train.sweep``
(also ``python -m fastjac sweep``).

    python -m fastjac.train.sweep --grid fig5 --seeds 0-4 --root runs/sweep --jobs 2 --out bench/results/sweep.json
    python -m fastjac.train.sweep --grid fig3 --seeds 0-2 --no-train     # evaluate what has finished, train nothing

A grid is a list of named configurations (:data:`CONFIGS`: a preset and CLI flags of ``python -m fastjac train``)
times seeds. Layout: one folder per (configuration, seed), ``ROOT/<config>/seed<k>/``, holding the training run's
``checkpoint.pt``, ``log.jsonl``, ``results.json``, ``model.safetensors``, ``sudoku_net.safetensors``,
``stdout.txt``, then ``DONE`` (JSON: wall time of the training process, command) once it finished, and
``common_eval.json`` (its evaluation on the common test set, keyed by that set's hash). A run with ``DONE`` is
never retrained; one with a checkpoint and no ``DONE`` resumes (the training loop's checkpoint/resume, refused if
the settings changed); ``jobs`` training processes run at a time (``threads`` torch threads each), under a progress
bar over runs. Evaluations run in ``jobs`` processes too and are cached.

The common test set (:func:`common_test_set`): per board size, ``n_test`` ID and ``n_test`` OOD puzzles from a
seed no training run uses (:data:`TEST_SEED`), minus any puzzle that occurs in the training set of seeds 0..9
(the 4x4 puzzle space is small enough for overlaps); every run of the sweep is evaluated on exactly this set (its
sha256 is in the JSON and in every run's ``common_eval.json``). Per run: board and cell accuracy, ID and OOD, at
each T of ``--steps`` (default 4, 8, 16, 32, 64, 128), and the finite-horizon exponents (T = 16 from X0, float64)
on the first ``--lyap-boards`` (16) ID boards: per board lambda_max and the mean exponent (dense, all exponents,
for S*D <= 1024; else the top 32, matrix-free), their mean over boards and its standard error.

The JSON (``--out``): machine, versions, thread count, load average; the test set's hashes; every run's status
(finished / interrupted / missing), wall time and evaluation; per configuration mean, sd and n over seeds of every
metric; same-seed differences against the configuration's baseline (the unregularised run of the same model and
board size) with mean, sd and n; for Lyapunov-target configurations the achieved lambda_max against the target;
and the one command that resumes the unfinished runs. PNGs (``--png-dir``): fig3 (achieved lambda_max vs target,
accuracy vs achieved lambda_max), fig4 (accuracy vs T with +-sd bands), fig5 (accuracy per regulariser, mean +- sd
with the seeds as points), sudoku6.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._checks import json_safe
from .._io import write_json

#: seed of the common test set (no training run uses it: training seeds are small ints)
TEST_SEED = 424_242
#: training sets of these seeds are removed from the common test set
EXCLUDE_SEEDS = tuple(range(10))
EVAL_STEPS = (4, 8, 16, 32, 64, 128)

# the Lyapunov-target runs: k = 4 tangents, one alignment pass (the unbiased default), 4 boards a step, no penalty
# for the first 2 epochs (250 steps) then a linear ramp over 2 more (at initialisation lambda_max ~ -1.5: a full
# weight would swamp the cross-entropy)


def _lyap_cfg(
    tau: float, weight: float = 1.0, aggregate: str = "board", preset: str = "cpu", every: int = 1, boards: int = 4
) -> Tuple[str, list]:
    return (
        preset,
        ["--lyap", str(weight), "--lyap-target", str(tau), "--lyap-k", "4", "--lyap-iters", "1"]
        + ["--lyap-boards", str(boards), "--reg-warmup", "250", "--reg-ramp", "250"]
        + (["--lyap-aggregate", aggregate] if aggregate != "board" else [])
        + (["--reg-every", str(every)] if every != 1 else []),
    )


#: name -> (label, preset, CLI flags of ``python -m fastjac train`` on top of the preset)
CONFIGS: Dict[str, Tuple[str, str, List[str]]] = {
    "original": ("Original", "cpu", []),
    "spec_1e-5": ("Spec 1e-5", "cpu", ["--spec", "1e-5"]),
    "spec_1e-4": ("Spec 1e-4", "cpu", ["--spec", "1e-4"]),
    "spec_1e-3": ("Spec 1e-3", "cpu", ["--spec", "1e-3"]),
    "e_single": ("E-single 1e-3", "cpu", ["--e-single", "1e-3"]),
    "e_multi": ("E-multi 1e-3", "cpu", ["--e-multi", "1e-3"]),
    "jac_frob": ("Jacobian Frobenius 1e-3", "cpu", ["--jac-frob", "1e-3"]),
    "jac_spec": ("Jacobian spectral 1e-2", "cpu", ["--jac-spec", "1e-2"]),
    "akorn": ("AKOrN Original", "cpu", ["--kind", "akorn"]),
    "s6_original": ("6x6 Original", "cpu6", []),
}
for _w, _agg in ((1.0, "board"), (1.0, "batch"), (0.1, "board")):
    for _tau in (-0.3, -0.15, 0.0, 0.1, 0.3):
        _p, _f = _lyap_cfg(_tau, _w, _agg)
        CONFIGS[f"lyap_w{_w:g}_{_agg}_t{_tau:g}"] = (f"Lyapunov tau={_tau:g} (w {_w:g}, {_agg})", _p, _f)
for _tau in (-0.3, -0.15, 0.0, 0.1, 0.3):  # the controlled Fig. 3 grid: the term every second step (half the cost)
    _p, _f = _lyap_cfg(_tau, 1.0, "board", every=2)
    CONFIGS[f"lyap_t{_tau:g}"] = (f"Lyapunov tau={_tau:g}", _p, _f)
for _tau in (-0.3, -0.15, 0.0, 0.1):
    _p, _f = _lyap_cfg(_tau, 1.0, "board", "cpu6", every=2)
    CONFIGS[f"s6_lyap_t{_tau:g}"] = (f"6x6 Lyapunov tau={_tau:g}", _p, _f)
# the Lyapunov term at <= 1.6x a plain step (bench/results/regularizers_lyap_cpu.json): every 4th step on 4 boards,
# or every 8th step on 16 boards
for _every, _boards in ((4, 4), (8, 16)):
    _p, _f = _lyap_cfg(0.1, 1.0, "board", every=_every, boards=_boards)
    CONFIGS[f"lyap_t0.1_b{_boards}e{_every}"] = (f"Lyapunov tau=0.1 ({_boards} boards every {_every} steps)", _p, _f)
# the loop's defaults for the Lyapunov term (every step, reg_samples = 8 boards): the done-criterion is
# stated for them
# (trained as "--lyap 1 --lyap-target 0.1" while the defaults had no warm-up; it lost long-T accuracy: OOD board
# 0.04 at T = 64, so the defaults became the automatic 250 + 250 steps, which lyap_default_warm_t0.1 spells out)
CONFIGS["lyap_default_t0.1"] = (
    "Lyapunov tau=0.1 (earlier defaults: no warm-up)",
    "cpu",
    ["--lyap", "1", "--lyap-target", "0.1", "--reg-warmup", "0", "--reg-ramp", "0"],
)
CONFIGS["lyap_default_warm_t0.1"] = (
    "Lyapunov tau=0.1 (loop defaults: warm-up/ramp 250/250)",
    "cpu",
    ["--lyap", "1", "--lyap-target", "0.1", "--reg-warmup", "250", "--reg-ramp", "250"],
)
for _n in ("spec_1e-4", "jac_frob"):
    CONFIGS["s6_" + _n] = ("6x6 " + CONFIGS[_n][0], "cpu6", CONFIGS[_n][2])

TAUS = (-0.3, -0.15, 0.0, 0.1, 0.3)
#: named grids (lists of configurations)
GRIDS: Dict[str, List[str]] = {
    "fig5": ["original", "spec_1e-5", "spec_1e-4", "spec_1e-3", "e_single", "e_multi", "jac_frob", "jac_spec"],
    "fig4": ["original", "akorn"],
    "fig3": [f"lyap_t{t:g}" for t in TAUS],
    "fig3_every1": [f"lyap_w1_board_t{t:g}" for t in TAUS],
    "fig3_batch": [f"lyap_w1_batch_t{t:g}" for t in TAUS],
    # Original against the best regulariser of the 4x4 Fig. 5 sweep (Lyapunov tau = -0.3: OOD +0.143 +- 0.060, n=3)
    "fig3_amortized": ["lyap_t0.1_b4e4", "lyap_t0.1_b16e8", "lyap_default_t0.1", "lyap_default_warm_t0.1"],
    "sudoku6": ["s6_original", "s6_lyap_t-0.3"],
}


def baseline_of(name: str) -> str:
    """The unregularised configuration a run is compared with (same model kind and board size)."""
    if name.startswith("s6_"):
        return "s6_original"
    return "akorn" if name == "akorn" or "--kind" in CONFIGS.get(name, ("", "", []))[2] else "original"


def lyap_target(name: str) -> Optional[float]:
    f = CONFIGS[name][2]
    return float(f[f.index("--lyap-target") + 1]) if "--lyap-target" in f else None


# ------------------------------------------------------------------------------------------------- layout


def run_dir(root: str, name: str, seed: int) -> str:
    return os.path.join(root, name, f"seed{seed}")


def status(root: str, name: str, seed: int) -> str:
    """ "finished" (DONE and results.json), "interrupted" (a checkpoint, no DONE) or "missing"."""
    d = run_dir(root, name, seed)
    if os.path.exists(os.path.join(d, "DONE")) and os.path.exists(os.path.join(d, "results.json")):
        return "finished"
    return "interrupted" if os.path.exists(os.path.join(d, "checkpoint.pt")) else "missing"


#: flags of ``--quick`` (appended to every run; the runs go to ROOT/quick): 1 epoch of 2000 boards, to try a grid
QUICK_FLAGS = ["--epochs", "1", "--n-train", "2000", "--n-test", "200"]


def train_command(
    name: str, seed: int, root: str, *, threads: int = 1, cache_dir: str = "", extra: Sequence[str] = ()
) -> List[str]:
    """The ``python -m fastjac.train.cli`` command line of one run (the final evaluation is left to the sweep);
    ``extra`` flags are appended (e.g. :data:`QUICK_FLAGS`)."""
    if name not in CONFIGS:
        raise ValueError(f"config: unknown {name!r}; expected one of {sorted(CONFIGS)}")
    _, preset, flags = CONFIGS[name]
    cmd = [
        sys.executable,
        "-m",
        "fastjac.train.cli",
        "--preset",
        preset,
        "--quiet",
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--out",
        run_dir(root, name, seed),
        "--eval-steps",
        "16",
        "--lyap-samples",
        "0",
    ]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    return cmd + list(flags) + list(extra)


def train_runs(
    runs: Sequence[Tuple[str, int]],
    root: str,
    *,
    jobs: int = 2,
    threads: int = 1,
    cache_dir: str = "",
    nice: int = 0,
    progress: bool = True,
    extra: Sequence[str] = (),
) -> Dict[Tuple[str, int], str]:
    """Train every (config, seed) of ``runs`` that is not finished, ``jobs`` processes at a time; returns each
    run's status afterwards. A failing run is reported (its stdout.txt keeps the error), not raised."""
    from tqdm.auto import tqdm

    todo = [r for r in runs if status(root, *r) != "finished"]
    procs: List[tuple] = []
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="runs", unit="run", disable=not progress)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    failed = set()
    try:
        while todo or procs:
            while todo and len(procs) < jobs:
                name, seed = todo.pop(0)
                d = run_dir(root, name, seed)
                os.makedirs(d, exist_ok=True)
                cmd = train_command(name, seed, root, threads=threads, cache_dir=cache_dir, extra=extra)
                log = open(os.path.join(d, "stdout.txt"), "a")
                pre = (lambda: os.nice(nice)) if nice else None
                procs.append(
                    (
                        (name, seed),
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pre),
                        log,
                        time.time(),
                        cmd,
                    )
                )
            time.sleep(1.0)
            for item in list(procs):
                key, p, log, t0, cmd = item
                if p.poll() is None:
                    continue
                log.close()
                procs.remove(item)
                d = run_dir(root, *key)
                if p.returncode == 0 and os.path.exists(os.path.join(d, "results.json")):
                    write_json(
                        os.path.join(d, "DONE"),
                        dict(
                            wall_s=time.time() - t0,
                            cmd=cmd[1:],
                            finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        ),
                        fallback=False,
                    )
                else:
                    failed.add(key)
                    bar.write(
                        f"[sweep] {key[0]} seed {key[1]} failed (rc={p.returncode}); see "
                        f"{os.path.join(d, 'stdout.txt')}"
                    )
                bar.update(1)
    finally:
        for _key, p, log, _, _ in procs:  # interrupted: the children checkpoint on SIGINT/SIGTERM and resume later
            p.terminate()
            p.wait()
            log.close()
        bar.close()
    return {r: status(root, *r) for r in runs}


# ------------------------------------------------------------------------------------------------- common test set


def _preset(name: str) -> Dict[str, Any]:
    from .loop import PRESETS

    return PRESETS[name]


def common_test_set(
    size: int,
    *,
    n_test: int = 500,
    n_train: Optional[int] = None,
    cache_dir: Optional[str] = None,
    exclude_seeds: Sequence[int] = EXCLUDE_SEEDS,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The one held-out test set of every run of a board size: {"test_id": (P, S), "test_ood": (P, S)}, each
    ``n_test`` puzzles from :data:`TEST_SEED`, none of which occurs in the training set (``n_train`` boards, the
    size's preset by default) of any seed in ``exclude_seeds``. Deterministic (a function of its arguments)."""
    from ..data import sudoku

    if n_train is None:
        n_train = _preset("cpu6" if size == 6 else "cpu")["n_train"]
    seen = set()
    for s in exclude_seeds:
        P, _ = sudoku.generate(n_train, size=size, givens=sudoku.ID_GIVENS[size], seed=s, cache_dir=cache_dir)
        seen.update(map(bytes, P.astype(np.int8)))
    out = {}
    for split, giv, off in (("test_id", sudoku.ID_GIVENS[size], 0), ("test_ood", sudoku.OOD_GIVENS[size], 1)):
        m = n_test
        while True:
            P, S = sudoku.generate(m, size=size, givens=giv, seed=TEST_SEED + off, cache_dir=cache_dir)
            keep = np.array([bytes(p.astype(np.int8)) not in seen for p in P])
            if keep.sum() >= n_test or m > 20 * n_test:
                break
            m = int(m * 1.5) + 1
        idx = np.nonzero(keep)[0][:n_test]
        out[split] = (P[idx], S[idx])
        out[split + "_removed"] = int((~keep[: idx[-1] + 1]).sum()) if len(idx) else 0
    return out


def testset_hash(ts: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k in ("test_id", "test_ood"):
        for a in ts[k]:
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- evaluation


def evaluate_run(
    d: str, ts: Dict[str, Any], *, steps: Sequence[int] = EVAL_STEPS, lyap_boards: int = 16, threads: int = 1
) -> Dict[str, Any]:
    """Evaluate the finished run in folder ``d`` on the common test set ``ts`` (cached in common_eval.json)."""
    import torch

    from .loop import evaluate, load_net, lyapunov_of

    key = dict(test_hash=testset_hash(ts), steps=[int(t) for t in steps], lyap_boards=int(lyap_boards))
    path = os.path.join(d, "common_eval.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("key") == key:
            return old
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    net = load_net(os.path.join(d, "sudoku_net.safetensors"))
    data = {k: (torch.from_numpy(ts[k][0]), torch.from_numpy(ts[k][1])) for k in ("test_id", "test_ood")}
    ev = evaluate(net, data, steps=tuple(steps))
    ly = lyapunov_of(net, data["test_id"][0][:lyap_boards], horizon=net.steps) if lyap_boards else None
    if ly:
        for k in ("max", "mean"):
            v = np.asarray(ly["per_board_" + k])
            ly[k + "_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    res = dict(key=key, eval=ev, lyapunov=ly, eval_s=time.perf_counter() - t0)
    write_json(path, res, fallback=False)  # strict JSON, atomic; a failure raises
    return res


def _eval_job(args):
    d, size, tkw, steps, lyap_boards, threads = args
    ts = common_test_set(size, **tkw)
    return d, evaluate_run(d, ts, steps=steps, lyap_boards=lyap_boards, threads=threads)


# ------------------------------------------------------------------------------------------------- aggregation


#: two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom (more: 2.0, conservative from df 11 on)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _stats(v: Sequence[float]) -> Dict[str, Any]:
    """mean, sd, n, the values, and ``ci95``: the half-width of the 95 % t-interval of the mean (None for n < 2).
    For same-seed differences, "the interval excludes 0" is what the docs call distinguishable from seed noise."""
    a = np.asarray([x for x in v if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(a) == 0:
        return dict(mean=None, sd=None, n=0)
    n = len(a)
    sd = float(a.std(ddof=1)) if n > 1 else None
    return dict(
        mean=float(a.mean()),
        sd=sd,
        n=int(n),
        ci95=(_T975[n - 2] if n - 1 <= len(_T975) else 2.0) * sd / math.sqrt(n) if n > 1 else None,
        values=[float(x) for x in a],
    )


def _metrics(e: Dict[str, Any]) -> Dict[str, float]:
    m = {}
    for split, byT in e["eval"].items():
        for T, v in byT.items():
            for kind in ("board", "cell"):
                m[f"{split}/T{T}/{kind}"] = v[kind]
    if e.get("lyapunov"):
        m["lambda_max"] = e["lyapunov"]["max"]
        m["lambda_mean"] = e["lyapunov"]["mean"]
        m["lambda_max_se"] = e["lyapunov"].get("max_se")
    return m


def aggregate(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per configuration: mean / sd / n over seeds of every metric; same-seed differences against the baseline."""
    by: Dict[str, Dict[int, Dict[str, float]]] = {}
    for r in records:
        if r.get("metrics"):
            by.setdefault(r["config"], {})[r["seed"]] = r["metrics"]
    out = {}
    for name, seeds in by.items():
        keys = sorted({k for m in seeds.values() for k in m})
        agg = dict(
            label=CONFIGS[name][0],
            seeds=sorted(seeds),
            baseline=baseline_of(name),
            stats={k: _stats([seeds[s].get(k) for s in sorted(seeds)]) for k in keys},
        )
        base = by.get(baseline_of(name))
        if base is not None and name != baseline_of(name):
            common = sorted(set(seeds) & set(base))
            agg["diff_vs_baseline"] = {
                k: dict(
                    _stats([seeds[s][k] - base[s][k] for s in common if k in seeds[s] and k in base[s]]), seeds=common
                )
                for k in keys
                if not k.endswith("_se")
            }
        tau = lyap_target(name)
        if tau is not None:
            agg["target"] = tau
            lm = agg["stats"].get("lambda_max", {})
            if lm.get("mean") is not None:
                agg["target_gap"] = dict(mean=lm["mean"] - tau, within_0_05=abs(lm["mean"] - tau) <= 0.05)
        out[name] = agg
    return out


def _pearson(x, y) -> Optional[float]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def fig3_analysis(records: List[Dict[str, Any]], configs: Sequence[str]) -> Dict[str, Any]:
    """Accuracy against achieved lambda_max over the runs of ``configs`` (Pearson r with n)."""
    pts = [r for r in records if r["config"] in configs and r.get("metrics") and "lambda_max" in r["metrics"]]
    res = dict(n_runs=len(pts))
    lam = [r["metrics"]["lambda_max"] for r in pts]
    for k in ("test_id/T16/board", "test_ood/T16/board", "test_ood/T64/board", "test_id/T16/cell", "test_ood/T16/cell"):
        res[f"r({k}, lambda_max)"] = _pearson([r["metrics"].get(k, float("nan")) for r in pts], lam)
    return res


# ------------------------------------------------------------------------------------------------- figures


def plot_all(summary: Dict[str, Any], records: List[Dict[str, Any]], png_dir: str) -> List[str]:
    """The PNGs of the grids present in the results; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(png_dir, exist_ok=True)
    agg = summary["configs"]
    written = []

    def st(name, key):
        s = agg.get(name, {}).get("stats", {}).get(key, {})
        return s.get("mean"), s.get("sd") or 0.0, s.get("values", [])

    # fig5: accuracy per regulariser
    names = [n for n in GRIDS["fig5"] + GRIDS["fig3"] + ["lyap_w1_board_t0.1"] if n in agg]
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, split in zip(axes, ("test_id", "test_ood")):
            for i, n in enumerate(names):
                m, sd, vals = st(n, f"{split}/T16/board")
                if m is None:
                    continue
                ax.bar(i, m, yerr=sd, color="C0" if n == "original" else "C1", alpha=0.7, capsize=3)
                ax.plot([i] * len(vals), vals, "k.", ms=4)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([agg[n]["label"] for n in names], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("board accuracy, T = 16")
            ax.set_title(f"{split} (mean +- sd over seeds; dots: seeds)")
        fig.tight_layout()
        p = os.path.join(png_dir, "sweep_fig5.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    # fig4: accuracy vs T bands
    names = [n for n in GRIDS["fig4"] if n in agg]
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, split in zip(axes, ("test_id", "test_ood")):
            for n in names:
                Ts = sorted({int(k.split("/")[1][1:]) for k in agg[n]["stats"] if k.startswith(split + "/")})
                ms = np.array([st(n, f"{split}/T{T}/board")[0] for T in Ts], float)
                sds = np.array([st(n, f"{split}/T{T}/board")[1] for T in Ts], float)
                ax.plot(Ts, ms, "o-", label=f"{agg[n]['label']} (n={len(agg[n]['seeds'])})")
                ax.fill_between(Ts, ms - sds, ms + sds, alpha=0.25)
            ax.axvline(16, color="gray", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("test-time loops T (trained at 16)")
            ax.set_ylabel("board accuracy")
            ax.set_title(split)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(png_dir, "sweep_fig4.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    # fig3: achieved lambda_max vs target; accuracy vs achieved lambda_max
    lyap = [n for n in agg if lyap_target(n) is not None and not n.startswith("s6_")]
    if lyap:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        fams = sorted({n.rsplit("_t", 1)[0] for n in lyap})
        for j, fam in enumerate(fams):
            ns = sorted([n for n in lyap if n.rsplit("_t", 1)[0] == fam], key=lyap_target)
            x = [lyap_target(n) for n in ns]
            y = [st(n, "lambda_max")[0] for n in ns]
            e = [st(n, "lambda_max")[1] for n in ns]
            fl = {
                "lyap": "term every 2nd step (fig3 grid)",
                "lyap_w1_board": "term every step",
                "lyap_w1_batch": "every step, batch mean",
                "lyap_w0.1_board": "weight 0.1",
            }.get(fam, fam)
            axes[0].errorbar(x, y, yerr=e, fmt="o-", capsize=3, label=f"{fl} (mean +- sd)", color=f"C{j}")
            for n in ns:
                axes[0].plot(
                    [lyap_target(n)] * len(st(n, "lambda_max")[2]),
                    st(n, "lambda_max")[2],
                    ".",
                    color=f"C{j}",
                    ms=4,
                    alpha=0.6,
                )
        lo, hi = min(TAUS) - 0.1, max(TAUS) + 0.1
        axes[0].plot([lo, hi], [lo, hi], "k--", lw=1, label="lambda_max = target")
        axes[0].fill_between([lo, hi], [lo - 0.05, hi - 0.05], [lo + 0.05, hi + 0.05], color="gray", alpha=0.15)
        for ref in ("original",):
            m, sd, _ = st(ref, "lambda_max")
            if m is not None:
                axes[0].axhline(m, color="C7", ls=":", label=f"Original {m:+.3f} +- {sd:.3f}")
        axes[0].set_xlabel("target tau")
        axes[0].set_ylabel("achieved lambda_max (16 held-out boards)")
        axes[0].legend(fontsize=7)
        pts = [
            r
            for r in records
            if r.get("metrics") and "lambda_max" in r["metrics"] and r["config"] in set(lyap) | {"original"}
        ]
        for ax, split in zip(axes[1:], ("test_id", "test_ood")):
            for r in pts:
                tau = lyap_target(r["config"])
                ax.scatter(
                    r["metrics"]["lambda_max"],
                    r["metrics"][f"{split}/T16/board"],
                    s=18,
                    c="k" if tau is None else [[(tau + 0.3) / 0.6, 0.2, 1 - (tau + 0.3) / 0.6]],
                    marker="s" if tau is None else "o",
                )
            ax.set_xlabel("achieved lambda_max")
            ax.set_ylabel(f"{split} board accuracy, T = 16")
            ax.set_title(f"{split}: o target runs (blue -0.3 ... red +0.3), s Original", fontsize=9)
        fig.tight_layout()
        p = os.path.join(png_dir, "sweep_fig3.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    names = [n for n in agg if n.startswith("s6_")]
    if names:
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.38
        for i, n in enumerate(names):
            for j, split in enumerate(("test_id", "test_ood")):
                m, sd, vals = st(n, f"{split}/T16/cell")
                if m is not None:
                    ax.bar(
                        i + (j - 0.5) * w,
                        m,
                        w,
                        yerr=sd,
                        color=f"C{j}",
                        alpha=0.7,
                        capsize=3,
                        label=split if i == 0 else None,
                    )
                    ax.plot([i + (j - 0.5) * w] * len(vals), vals, "k.", ms=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([agg[n]["label"] for n in names], rotation=20, fontsize=8)
        ax.set_ylabel("cell accuracy, T = 16")
        ax.set_title("6x6 Sudoku (mean +- sd over seeds)")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(png_dir, "sweep_sudoku6.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


# ------------------------------------------------------------------------------------------------- report


def markdown(summary: Dict[str, Any]) -> str:
    """Markdown tables of a summary: per configuration (n, accuracies, lambda_max, same-seed differences), the
    Lyapunov targets, accuracy against T, and the unfinished runs (what docs/training.md quotes)."""
    agg = summary["configs"]

    def ms(name, key, nd=3, sign=False):
        v = agg[name]["stats"].get(key, {})
        if v.get("mean") is None:
            return "-"
        f = f"{{:{'+' if sign else ''}.{nd}f}}"
        return f.format(v["mean"]) + (f" ± {v['sd']:.{nd}f}" if v.get("sd") is not None else "")

    def dm(name, key):
        """mean ± sd (n), with * when the 95 % t-interval of the same-seed difference excludes 0"""
        d = agg[name].get("diff_vs_baseline", {}).get(key, {})
        if d.get("mean") is None:
            return "-"
        star = "*" if d.get("ci95") is not None and abs(d["mean"]) > d["ci95"] else ""
        return f"{d['mean']:+.3f}" + ("" if d.get("sd") is None else f" ± {d['sd']:.3f}") + f" (n={d['n']}){star}"

    lines = [
        "| config | n | ID board T=16 | OOD board T=16 | OOD board T=64 | ID cell T=16 | OOD cell T=16 | lambda_max "
        "| mean exponent | OOD board T=16 vs baseline, same seed | OOD cell T=16 vs baseline, same seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in agg:
        lines.append(
            f"| {agg[n]['label']} | {len(agg[n]['seeds'])} | {ms(n, 'test_id/T16/board')} | "
            f"{ms(n, 'test_ood/T16/board')} | {ms(n, 'test_ood/T64/board')} | {ms(n, 'test_id/T16/cell')} | "
            f"{ms(n, 'test_ood/T16/cell')} | {ms(n, 'lambda_max', sign=True)} | {ms(n, 'lambda_mean', sign=True)} | "
            f"{dm(n, 'test_ood/T16/board')} | {dm(n, 'test_ood/T16/cell')} |"
        )
    dkeys = ("lambda_max", "test_id/T16/board", "test_ood/T16/board", "test_ood/T64/board", "test_id/T16/cell")
    dkeys += ("test_ood/T16/cell",)
    withd = [n for n in agg if agg[n].get("diff_vs_baseline")]
    if withd:
        lines += [
            "",
            "Same-seed differences against the baseline (mean ± sd over the seeds both have, n; * = the 95 % "
            "t-interval excludes 0, i.e. distinguishable from seed noise):",
            "",
            "| config | baseline | lambda_max | ID board T=16 | OOD board T=16 | OOD board T=64 | ID cell T=16 "
            "| OOD cell T=16 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in withd:
            b = agg[n]["baseline"]
            lines.append(
                f"| {agg[n]['label']} | {agg[b]['label'] if b in agg else b} | "
                + " | ".join(dm(n, k) for k in dkeys)
                + " |"
            )
    tg = [n for n in agg if "target" in agg[n]]
    if tg:
        lines += [
            "",
            "| config | target | achieved lambda_max (mean ± sd over seeds) | per-run SE (16 boards) | gap "
            "| within 0.05 |",
            "|---|---|---|---|---|---|",
        ]
        for n in sorted(tg, key=lambda n: (n.split("_t")[0], agg[n]["target"])):
            se = agg[n]["stats"].get("lambda_max_se", {}).get("mean")
            g = agg[n].get("target_gap", {})
            lines.append(
                f"| {agg[n]['label']} | {agg[n]['target']:+.2f} | {ms(n, 'lambda_max', sign=True)} (n="
                f"{len(agg[n]['seeds'])}) | {'-' if se is None else f'{se:.3f}'} | "
                f"{'-' if g.get('mean') is None else format(g['mean'], '+.3f')} | "
                f"{'-' if g.get('mean') is None else ('yes' if g['within_0_05'] else 'no')} |"
            )
    Ts = summary.get("eval_steps", [])
    lines += ["", "| config | split | " + " | ".join(f"T={t}" for t in Ts) + " |", "|---|---|" + "---|" * len(Ts)]
    for n in agg:
        for split in ("test_id", "test_ood"):
            lines.append(
                f"| {agg[n]['label']} | {split} | " + " | ".join(ms(n, f"{split}/T{t}/board") for t in Ts) + " |"
            )
    lines += [
        "",
        "| config | finished runs (seeds; i: imported) | wall time of a run, s: mean (min-max) "
        "| optimizer time, s: mean |",
        "|---|---|---|---|",
    ]
    for n in agg:
        rs = [r for r in summary["runs"] if r["config"] == n and r["status"] == "finished"]
        w = [r["wall_s"] for r in rs if r.get("wall_s") is not None]
        t = [r["train_time_s"] for r in rs if r.get("train_time_s") is not None]
        lines.append(
            f"| {agg[n]['label']} | {len(rs)} "
            f"({', '.join(str(r['seed']) + ('i' if r.get('imported_from') else '') for r in rs)}) | "
            + (f"{np.mean(w):.0f} ({min(w):.0f}-{max(w):.0f})" if w else "-")
            + " | "
            + (f"{np.mean(t):.0f}" if t else "-")
            + " |"
        )
    un = summary["status"]["unfinished"]
    lines += [
        "",
        f"Finished runs: {summary['status']['finished']}; not finished: "
        + (", ".join(f"{c} seed {s} ({st})" for c, s, st in un) if un else "none")
        + ".",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- driver


def _seeds(spec: Sequence[str]) -> List[int]:
    out: List[int] = []
    for s in spec:
        for part in str(s).split(","):
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    out += list(range(int(a), int(b) + 1))
                elif part:
                    out.append(int(part))
            except ValueError:
                raise ValueError(f"seeds: expected ints >= 0 or ranges like 0-4, got {part!r}") from None
    if not out or any(s < 0 for s in out):
        raise ValueError(f"seeds: expected ints >= 0 or ranges like 0-4, got {list(spec)!r}")
    return sorted(set(out))


def _machine() -> Dict[str, Any]:
    import platform

    import torch

    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return dict(
        host=platform.node(),
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=np.__version__,
        loadavg=load,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def load_imports(paths: Sequence[str], runs: Sequence[Tuple[str, int]]) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """The finished run records of the summary JSONs ``paths`` that belong to ``runs``: {(config, seed): record}
    (the first file that has a run wins), each marked with ``imported_from``. Only strict JSON is read."""
    out: Dict[Tuple[str, int], Dict[str, Any]] = {}
    want = set(runs)
    for p in paths:
        try:
            with open(p) as f:
                summary = json.load(f)
            recs = summary["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"imports: {p!r} is not a readable sweep summary JSON ({e})") from None
        for r in recs:
            key = (r.get("config"), r.get("seed"))
            if key in want and key not in out and r.get("status") == "finished" and r.get("metrics"):
                out[key] = dict(r, imported_from=p)
    return out


def sweep(
    configs: Sequence[str],
    seeds: Sequence[int],
    *,
    root: str = "runs/sweep",
    jobs: int = 2,
    threads: int = 1,
    train: bool = True,
    out: Optional[str] = None,
    png_dir: Optional[str] = None,
    cache_dir: str = "",
    steps: Sequence[int] = EVAL_STEPS,
    lyap_boards: int = 16,
    nice: int = 0,
    progress: bool = True,
    argv: Optional[List[str]] = None,
    n_test: int = 500,
    n_train_exclude: Optional[int] = None,
    extra: Sequence[str] = (),
    runs: Optional[Sequence[Tuple[str, int]]] = None,
    imports: Sequence[str] = (),
) -> Dict[str, Any]:
    """Train (unless ``train=False``) and evaluate the grid ``configs`` x ``seeds`` (or the explicit (config, seed)
    pairs ``runs``); returns the summary dict
    (also written to ``out`` as JSON, with PNGs in ``png_dir``). ``n_test`` / ``n_train_exclude``: the common test
    set's size and the training-set size whose boards it excludes (:func:`common_test_set`).

    ``imports``: earlier summary JSONs (``--import``) whose finished runs stand in for runs whose folders are not
    finished under ``root`` (e.g. run folders that were not kept): such a run is not trained again, its record is
    taken as it is (``imported_from`` names the file) and only if it was evaluated on this very common test set
    (same hash, same T values, same number of Lyapunov boards); otherwise a ValueError. A run finished under
    ``root`` always wins over an imported one."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    runs = list(runs) if runs is not None else [(n, s) for n in configs for s in seeds]
    configs = list(dict.fromkeys(n for n, _ in runs))
    for n in configs:
        if n not in CONFIGS:
            raise ValueError(f"configs: unknown {n!r}; expected some of {sorted(CONFIGS)}")
    imported = load_imports(imports, runs)
    t0 = time.time()
    if train:
        todo = [r for r in runs if r not in imported or status(root, *r) == "interrupted"]
        train_runs(
            todo, root, jobs=jobs, threads=threads, cache_dir=cache_dir, nice=nice, progress=progress, extra=extra
        )
    t_train = time.time() - t0
    sizes = {n: (6 if CONFIGS[n][1] == "cpu6" else 4) for n in configs}
    tkw = dict(n_test=n_test, n_train=n_train_exclude, cache_dir=cache_dir or None)
    done = [r for r in runs if status(root, *r) == "finished"]
    imported = {r: v for r, v in imported.items() if r not in done}
    # the common test set of every board size that has a finished run (built once here, cached by the generator)
    test_sets = {sz: common_test_set(sz, **tkw) for sz in sorted({sizes[n] for n, _ in done + list(imported)})}
    for (name, seed), rec in imported.items():
        want = dict(
            test_hash=testset_hash(test_sets[sizes[name]]), steps=[int(t) for t in steps], lyap_boards=lyap_boards
        )
        got = dict(
            test_hash=rec.get("test_hash"),
            steps=sorted(int(t) for t in rec["eval"]["test_id"]),
            lyap_boards=(rec.get("lyapunov") or {}).get("boards", 0),
        )
        if got != want:
            raise ValueError(
                f"imports: {rec['imported_from']}: run {name} seed {seed} was evaluated with {got}, this sweep "
                f"evaluates with {want}; train it again (remove it from the import) or match the settings"
            )
    jobs_args = [(run_dir(root, *r), sizes[r[0]], tkw, tuple(steps), lyap_boards, threads) for r in done]
    evals: Dict[str, Any] = {}
    bar = tqdm(total=len(jobs_args), desc="eval", unit="run", disable=not progress)
    if jobs > 1 and len(jobs_args) > 1:
        with ProcessPoolExecutor(jobs) as ex:
            for d, e in ex.map(_eval_job, jobs_args):
                evals[d] = e
                bar.update(1)
    else:
        for a in jobs_args:
            d, e = _eval_job(a)
            evals[d] = e
            bar.update(1)
    bar.close()
    records = []
    for name, seed in runs:
        d = run_dir(root, name, seed)
        if (name, seed) in imported:
            records.append(imported[(name, seed)])
            continue
        # a run that finished while the others were evaluated counts as not finished in this summary
        rec: Dict[str, Any] = dict(
            config=name,
            seed=seed,
            dir=d,
            status="finished" if d in evals else status(root, name, seed).replace("finished", "interrupted"),
        )
        if rec["status"] == "finished":
            with open(os.path.join(d, "DONE")) as f:
                rec["wall_s"] = json.load(f).get("wall_s")
            with open(os.path.join(d, "results.json")) as f:
                r = json.load(f)
            rec["train_time_s"] = r.get("train_time_s")
            rec["heldout_lambda_max_per_epoch"] = r.get("heldout_lambda_max_per_epoch")
            e = evals[d]
            rec["test_hash"] = e["key"]["test_hash"]
            rec["eval"], rec["lyapunov"] = e["eval"], e["lyapunov"]
            rec["metrics"] = _metrics(e)
        elif rec["status"] == "interrupted":
            try:
                import torch

                ck = torch.load(os.path.join(d, "checkpoint.pt"), map_location="cpu", weights_only=True)
                rec["step"] = int(ck["step"])
            except Exception:  # a checkpoint being written: its step is unknown
                rec["step"] = None
        records.append(rec)
    agg = aggregate(records)
    unfinished = [r for r in records if r["status"] != "finished"]
    summary = dict(
        machine=_machine(),
        threads_per_run=threads,
        jobs=jobs,
        root=root,
        train_wall_s=t_train,
        test_sets={
            str(sz): dict(
                hash=testset_hash(ts),
                n_id=len(ts["test_id"][0]),
                n_ood=len(ts["test_ood"][0]),
                seed=TEST_SEED,
                removed_as_in_training=[ts["test_id_removed"], ts["test_ood_removed"]],
                excluded_training_seeds=list(EXCLUDE_SEEDS),
            )
            for sz, ts in test_sets.items()
        },
        eval_steps=list(steps),
        lyap_boards=lyap_boards,
        configs=agg,
        # the controlled Fig. 3 grid with Original; and every 4x4 target run pooled (the 6x6 runs are another task:
        # pooling them would mix two accuracy scales)
        fig3=fig3_analysis(records, GRIDS["fig3"] + ["original"]),
        fig3_pooled_4x4=fig3_analysis(
            records, [n for n in configs if lyap_target(n) is not None and baseline_of(n) == "original"] + ["original"]
        ),
        status=dict(
            finished=len(runs) - len(unfinished), unfinished=[(r["config"], r["seed"], r["status"]) for r in unfinished]
        ),
        imported_runs=len(imported),
        imported_from=list(imports),
        resume_command=("python -m fastjac.train.sweep " + " ".join(argv)) if argv is not None else None,
        runs=records,
    )
    summary = json_safe(summary)
    if png_dir:
        summary["figures"] = plot_all(summary, records, png_dir)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json(out, summary, fallback=False)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastjac.train.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="grids: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in GRIDS.items()),
    )
    p.add_argument(
        "--grid",
        nargs="+",
        default=[],
        help="named grids (fig3, fig4, fig5, fig3_batch, sudoku6); "
        "GRID@SEEDS (e.g. fig3@0-2) gives that grid its own seeds instead of --seeds",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=[],
        help="configuration names (see CONFIGS) besides the grids; NAME@SEEDS gives one its own seeds",
    )
    p.add_argument(
        "--import",
        dest="imports",
        nargs="+",
        default=[],
        metavar="JSON",
        help="earlier summary JSONs whose finished runs (same common test set) stand in for runs not finished under "
        "ROOT: they are not trained again",
    )
    p.add_argument("--seeds", nargs="+", default=["0-2"], help="seeds: ints or ranges, e.g. 0-4 (default 0-2)")
    p.add_argument("--root", default="runs/sweep", help="run folders: ROOT/<config>/seed<k>/ (default runs/sweep)")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--nice", type=int, default=0, help="niceness added to the training processes")
    p.add_argument("--no-train", action="store_true", help="train nothing: evaluate the finished runs")
    p.add_argument("--out", default="", help="the summary JSON (default ROOT/sweep.json)")
    p.add_argument("--png-dir", default="", help="write the figures here (default: the JSON's folder)")
    p.add_argument("--cache-dir", default="", help="Sudoku cache folder (default the fastjac cache)")
    p.add_argument("--steps", type=int, nargs="+", default=list(EVAL_STEPS), help="test-time T values")
    p.add_argument("--lyap-boards", type=int, default=16, help="held-out boards for lambda_max (default 16)")
    p.add_argument("--quick", action="store_true", help="1 epoch of 2000 boards per run, in ROOT/quick (a try-out)")
    p.add_argument("--markdown", default="", help="also write the summary's markdown tables to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a batch scheduler) unwinds like Ctrl-C, so :func:`train_runs` stops its children (they
    checkpoint) instead of leaving them running orphaned."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fastjac.train.sweep`` / ``python -m fastjac sweep``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    old_term = _sigterm_as_interrupt()
    try:
        seeds = _seeds(a.seeds)
        runs: List[Tuple[str, int]] = []
        for g in a.grid:
            g, _, sd = g.partition("@")
            if g not in GRIDS:
                raise ValueError(f"--grid: unknown {g!r}; expected some of {sorted(GRIDS)}")
            runs += [(n, s) for n in GRIDS[g] for s in (_seeds([sd]) if sd else seeds)]
        for c in a.configs:
            c, _, sd = c.partition("@")
            runs += [(c, s) for s in (_seeds([sd]) if sd else seeds)]
        runs = list(dict.fromkeys(runs))
        configs = list(dict.fromkeys(n for n, _ in runs))
        if not configs:
            raise ValueError("--grid/--configs: name at least one grid or configuration")
        for name, v, lo in (("--jobs", a.jobs, 1), ("--threads", a.threads, 1), ("--lyap-boards", a.lyap_boards, 0)):
            if v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
        root = os.path.join(a.root, "quick") if a.quick else a.root
        out = a.out or os.path.join(root, "sweep.json")
        summary = sweep(
            configs,
            seeds,
            runs=runs,
            root=root,
            jobs=a.jobs,
            threads=a.threads,
            train=not a.no_train,
            out=out,
            png_dir=a.png_dir or os.path.dirname(os.path.abspath(out)),
            cache_dir=a.cache_dir,
            steps=a.steps,
            lyap_boards=a.lyap_boards,
            nice=a.nice,
            progress=not a.quiet,
            argv=[x for x in argv if x != "--no-train"],
            extra=QUICK_FLAGS if a.quick else (),
            n_test=200 if a.quick else 500,
            imports=a.imports,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the runs checkpointed; the same command resumes them", file=sys.stderr)
        return 130
    finally:
        if old_term is not None:
            import signal

            signal.signal(signal.SIGTERM, old_term)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(summary))
    st = summary["status"]
    print(f"{st['finished']} runs finished, {len(st['unfinished'])} not; summary: {out}")
    for name, agg in summary["configs"].items():
        s = agg["stats"]

        def f(k, s=s):
            m = s.get(k, {}).get("mean")
            return "-" if m is None else f"{m:.3f}" + ("" if s[k]["sd"] is None else f"+-{s[k]['sd']:.3f}")

        print(
            f"  {name:24s} n={len(agg['seeds'])}  ID {f('test_id/T16/board')}  OOD {f('test_ood/T16/board')}  "
            f"lambda_max {f('lambda_max')}"
        )
    if st["unfinished"]:
        print(f"resume: {summary['resume_command']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "CONFIGS",
    "GRIDS",
    "TAUS",
    "TEST_SEED",
    "common_test_set",
    "testset_hash",
    "train_runs",
    "train_command",
    "evaluate_run",
    "aggregate",
    "sweep",
    "main",
    "status",
    "run_dir",
    "baseline_of",
    "markdown",
    "load_imports",
    "QUICK_FLAGS",
]
