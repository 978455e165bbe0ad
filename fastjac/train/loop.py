"""Training of the Sudoku models with any combination of regularisers: Adam, gradient clipping, optional EMA, a
progress bar, checkpoint/resume, JSON logs, and evaluation (board and cell accuracy, ID and OOD, at several T).

    from fastjac.train.loop import TrainConfig, train
    res = train(TrainConfig.preset("cpu", out="runs/cpu", jac_frob=1e-2))
    res["eval"]["test_id"]["16"]["board"]

Everything random is derived from ``seed``: the data (fastjac.data.sudoku, cached), the initial weights, the
batch order of epoch e (a permutation seeded by (seed, e)), and the regularisers' probes at step t (seed by
(seed, t)). So a run that is stopped and resumed from its checkpoint ends with the weights of an uninterrupted
run, bit for bit on the same machine (tests/test_train.py checks it).

Files in ``out``: ``checkpoint.pt`` (atomic; loaded with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only), ``log.jsonl`` (one JSON line per logged step and per evaluation),
``results.json`` (config, final evaluation, Lyapunov exponents, timings), ``model.safetensors`` (the trained
recurrent core, ``fj.load_model``-able) and ``sudoku_net.safetensors`` (the whole Sudoku model: embedding,
positions, core, readout; :func:`load_net`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import NonFiniteError
from .._io import check_out_dir, json_text, save_atomic, write_json, write_with_fallback
from . import regularizers as R
from .sudoku_models import SudokuNet, accuracy, sudoku_loss

PRESETS: Dict[str, Dict[str, Any]] = {
    # 4x4 boards, trains in a few minutes on 2 CPU cores (docs/training.md has the measured numbers)
    "cpu": dict(
        size=4,
        dim=32,
        heads=4,
        steps=16,
        batch_size=64,
        n_train=8000,
        n_test=500,
        epochs=20,
        lr=3e-3,
        eval_steps=(16, 32, 64),
        lyap_samples=16,
    ),  # 16 boards: lambda_max's standard error ~0.01, not 0.04
    # the paper's setting (9x9, D = 512, H = 8, batch 100, 100 epochs): for a GPU
    "paper": dict(
        size=9,
        dim=512,
        heads=8,
        steps=16,
        batch_size=100,
        n_train=9000,
        n_test=1000,
        epochs=100,
        lr=5e-4,
        eval_steps=(16, 32, 64),
        lyap_samples=1,
        device="cuda",
    ),
}
# 6x6 boards (2x3 boxes; no solution recall: ~2.8e7 grids), the harder CPU task (docs/training.md): the cpu preset
# on 16000 boards for 30 epochs (7500 steps), with the 4-board lambda estimate. Measured: 4000 boards x 20 epochs
# (1260 steps) never left the plateau (cell accuracy 0.27, board 0); 16000 x 10 epochs left it at ~900 steps and
# ended at cell accuracy 0.65 ID / 0.44 OOD, board 0.00, cross-entropy still falling when the cosine schedule ended
PRESETS["cpu6"] = dict(PRESETS["cpu"], size=6, n_train=16000, epochs=30, lyap_samples=4)

#: the automatic warm-up and ramp of the regulariser weights when the Lyapunov term is on: this fraction of the
#: configured optimizer steps each (250 + 250 of the CPU preset's 2500; TrainConfig says why)
LYAP_AUTO_SCHEDULE = 0.1

# fields that do not change the trajectory of the weights (excluded from the resume fingerprint)
_NON_TRAJECTORY = (
    "out",
    "progress",
    "stop_at",
    "checkpoint_every",
    "log_every",
    "eval_steps",
    "lyap_samples",
    "cache_dir",
    "threads",
    "eval_every",
    "lyap_log_boards",
)
# fields added after checkpoints of the other fields were written: left out of the fingerprint while they cannot
# change the trajectory (at the value the code before them behaved as, or the lyap_* ones with lyap = 0), so those
# checkpoints still resume and a non-Lyapunov run keeps its fingerprint
_LEGACY = {
    "lyap_iters": 0,
    "lyap_form": "squared",
    "lyap_aggregate": "board",
    "lyap_boards": 0,
    "reg_warmup": 0,
    "reg_ramp": 0,
}


@dataclass
class TrainConfig:
    """All settings of one training run (``python -m fastjac train --help`` lists them as flags).

    Regularisers (weights; 0 = off): spec, e_single, e_multi (E-multi trains with the orthogonal parametrisation of
    W^V and W^O; ``e_multi_hard`` makes its constraints exact instead, with no penalty), jac_frob (Hutchinson
    |J|_F^2 with ``probes`` probes), jac_spec (sigma_max(J)^2 with ``jac_iters`` power steps), lyap
    ((lambda_max - lyap_target)^2 of the finite-horizon exponents over ``steps`` steps with ``lyap_k`` tangents).
    The Jacobian terms use the first ``reg_samples`` boards of each batch: jac_* at the input of the last step,
    lyap from X0; they are computed every ``reg_every`` steps (1: every step), at the weight given.

    Lyapunov term (:func:`fastjac.train.regularizers.lyapunov_penalty`): ``lyap_iters`` subspace-iteration passes
    (default 1: the unbiased lambda_max; 0: the random frame, biased low by ~0.15 at k = 4), ``lyap_form``
    "squared" | "above" | "below" (one-sided hinges), ``lyap_aggregate`` "board" (every board pulled to the
    target) | "batch" (the batch mean), ``lyap_boards`` boards per step (0: ``reg_samples``). Weight schedule of
    every regulariser: 0 for ``reg_warmup`` optimizer steps, then a linear ramp over ``reg_ramp`` steps
    (:func:`~fastjac.train.regularizers.ramp_weight`); -1 (the default) resolves in :meth:`validate` to
    :data:`LYAP_AUTO_SCHEDULE` (10 %) of the configured steps each when the Lyapunov term is on, else 0: measured
    on the CPU preset (τ = 0.1, 3 seeds each, docs/training.md), no warm-up hit the target (λ_max +0.094 ± 0.008)
    but lost accuracy beyond the training T (OOD board 0.039 ± 0.015 at T = 64 against Original's 0.527 ± 0.130),
    250 + 250 steps hit it as well (+0.090 ± 0.015) and kept it (0.541 ± 0.053). ``lyap_log_boards`` held-out boards (the first of test_id)
    have their finite-horizon lambda_max (k = 4, 2 alignment passes, float64) logged after every epoch (0: off;
    no random draw, so the training trajectory does not depend on it).
    """

    kind: str = "itrsa"
    size: int = 4
    dim: int = 32
    heads: int = 4
    steps: int = 16
    osc_dim: int = 4
    n_train: int = 8000
    n_test: int = 500
    batch_size: int = 64
    epochs: int = 20
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    ema: float = 0.0
    spec: float = 0.0
    e_single: float = 0.0
    e_multi: float = 0.0
    e_multi_hard: bool = False
    jac_frob: float = 0.0
    jac_spec: float = 0.0
    lyap: float = 0.0
    lyap_target: float = 0.1
    probes: int = 4
    jac_iters: int = 2
    lyap_k: int = 4
    reg_samples: int = 8
    reg_every: int = 1
    lyap_iters: int = 1
    lyap_form: str = "squared"
    lyap_aggregate: str = "board"
    lyap_boards: int = 0
    reg_warmup: int = -1
    reg_ramp: int = -1
    lyap_log_boards: int = 16
    eval_steps: Tuple[int, ...] = (16, 32, 64)
    eval_every: int = 0
    lyap_samples: int = 4
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    checkpoint_every: int = 200
    log_every: int = 20
    stop_at: int = 0
    progress: bool = True
    cache_dir: str = ""
    threads: int = 0

    @staticmethod
    def preset(name: str, **overrides) -> "TrainConfig":
        """The settings of a preset ("cpu", "paper"), with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        cfg = dict(PRESETS[name])
        cfg.update(overrides)
        return TrainConfig(**cfg)

    def validate(self) -> "TrainConfig":
        if self.kind not in ("itrsa", "akorn"):
            raise ValueError(f"kind: expected 'itrsa' or 'akorn', got {self.kind!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        for name in (
            "dim",
            "heads",
            "steps",
            "n_train",
            "n_test",
            "batch_size",
            "epochs",
            "probes",
            "lyap_k",
            "reg_samples",
            "reg_every",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("lyap_iters", "lyap_boards", "lyap_log_boards"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        for name in ("reg_warmup", "reg_ramp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < -1:
                raise ValueError(f"{name}: expected an int >= 0, or -1 (automatic), got {v!r}")
        if self.lyap_form not in R.PENALTY_FORMS:
            raise ValueError(f"lyap_form: expected one of {R.PENALTY_FORMS}, got {self.lyap_form!r}")
        if self.lyap_aggregate not in R.PENALTY_AGGREGATES:
            raise ValueError(f"lyap_aggregate: expected one of {R.PENALTY_AGGREGATES}, got {self.lyap_aggregate!r}")
        for name in ("spec", "e_single", "e_multi", "jac_frob", "jac_spec", "lyap", "weight_decay", "ema"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        if self.ema >= 1:
            raise ValueError(f"ema: expected a decay in [0, 1), got {self.ema}")
        if isinstance(self.lr, bool) or not (
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0
        ):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        for name in ("clip", "lyap_target"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or (name == "clip" and v < 0)
            ):
                raise ValueError(
                    f"{name}: expected a finite number{' >= 0 (0: off)' if name == 'clip' else ''}, got {v!r}"
                )
        for name, lo in (
            ("checkpoint_every", 1),
            ("log_every", 1),
            ("jac_iters", 1),
            ("osc_dim", 1),
            ("warmup", 0),
            ("stop_at", 0),
            ("eval_every", 0),
            ("lyap_samples", 0),
            ("threads", 0),
            ("seed", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        from ..data import sudoku

        if isinstance(self.size, bool) or self.size not in sudoku.SIZES:
            raise ValueError(f"size: expected a board side in {sudoku.SIZES}, got {self.size!r}")
        try:
            steps = tuple(self.eval_steps) if not isinstance(self.eval_steps, (int, str)) else None
        except TypeError:
            steps = None
        if not steps or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in steps):
            raise ValueError(
                f"eval_steps: expected one or more ints >= 1 (recurrent steps T of the final "
                f"evaluation), got {self.eval_steps!r}"
            )
        self.eval_steps = steps
        from ..models import check_model_size

        check_model_size(
            self.dim,
            self.heads,
            osc_dim=self.osc_dim if self.kind == "akorn" else None,
            dtype=torch.float32,
            what=f"{self.kind} core",
        )  # before anything is allocated
        self.device = _check_device(self.device)
        if not isinstance(self.cache_dir, str) or (
            self.cache_dir and os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir)
        ):
            raise ValueError(f"cache_dir: {self.cache_dir!r} is not a folder; pass a folder (or '' for the default)")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out: expected a folder path, got {self.out!r}")
        if -1 in (self.reg_warmup, self.reg_ramp):  # the automatic schedule (see the class docstring)
            auto = int(LYAP_AUTO_SCHEDULE * math.ceil(self.n_train / self.batch_size) * self.epochs) if self.lyap else 0
            return dataclasses.replace(
                self,
                reg_warmup=auto if self.reg_warmup == -1 else self.reg_warmup,
                reg_ramp=auto if self.reg_ramp == -1 else self.reg_ramp,
            )
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_steps"] = list(self.eval_steps)
        return d


def _check_device(device) -> str:
    """A device string torch understands and that holds data here (no 'meta'; cuda/mps only when present)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device: not a torch device: {device!r} ({str(e).splitlines()[0][:120]})") from None
    if dev.type == "meta":
        raise ValueError("device: 'meta' tensors hold no data; train on 'cpu' or 'cuda'")
    mod = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    if dev.type != "cpu" and not (mod is not None and hasattr(mod, "is_available") and mod.is_available()):
        raise ValueError(f"device: {device!r} but no {dev.type} device is present here (pass --device cpu)")
    return str(device)


def _fingerprint(cfg: TrainConfig) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NON_TRAJECTORY}
    for k, legacy in _LEGACY.items():
        if d[k] == legacy or (k.startswith("lyap_") and cfg.lyap == 0):
            del d[k]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build_net(cfg: TrainConfig) -> SudokuNet:
    """The Sudoku model of a config (with E-multi's parametrisation applied when asked)."""
    net = SudokuNet(
        cfg.kind,
        size=cfg.size,
        dim=cfg.dim,
        heads=cfg.heads,
        steps=cfg.steps,
        osc_dim=cfg.osc_dim,
        dtype=torch.float32,
        seed=cfg.seed,
    )
    if cfg.e_multi > 0 or cfg.e_multi_hard:
        R.orthogonal_values(net.core, hard=cfg.e_multi_hard)
    return net.to(cfg.device)


def load_data(cfg: TrainConfig):
    from ..data import sudoku

    sp = sudoku.splits(
        cfg.size,
        n_train=cfg.n_train,
        n_test=cfg.n_test,
        seed=cfg.seed,
        cache_dir=cfg.cache_dir or None,
        progress=cfg.progress,
    )
    return {k: (torch.from_numpy(p), torch.from_numpy(s)) for k, (p, s) in sp.items()}


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def regularizer_terms(cfg: TrainConfig, net: SudokuNet, xs: List[Tensor], C: Tensor, step: int) -> Dict[str, Tensor]:
    """The weighted regulariser terms of one training step (a dict name -> 0-dim tensor, before the weights)."""
    terms: Dict[str, Tensor] = {}
    seed = (cfg.seed * 1_000_003 + step) % (2**62)
    if cfg.spec > 0:
        terms["spec"] = R.spec(net.core, seed=cfg.seed)
    if cfg.e_single > 0:
        terms["e_single"] = R.e_single(net.core)
    if cfg.e_multi > 0:
        terms["e_multi"] = R.e_multi(net.core, orthogonality=False)  # the parametrisation makes it exact
    if step % cfg.reg_every:
        return terms
    r = slice(0, min(cfg.reg_samples, C.shape[0]))
    if cfg.jac_frob > 0:
        terms["jac_frob"] = R.jacobian_frobenius(net.core, xs[-2][r], C=C[r], probes=cfg.probes, seed=seed)
    if cfg.jac_spec > 0:
        terms["jac_spec"] = R.jacobian_spectral(net.core, xs[-2][r], C=C[r], iters=cfg.jac_iters, seed=seed)
    if cfg.lyap > 0:
        rl = slice(0, min(cfg.lyap_boards or cfg.reg_samples, C.shape[0]))
        terms["lyap"] = R.lyapunov_penalty(
            net.core,
            xs[0][rl],
            C=C[rl],
            target=cfg.lyap_target,
            horizon=cfg.steps,
            k=cfg.lyap_k,
            iters=cfg.lyap_iters,
            seed=seed,
            form=cfg.lyap_form,
            aggregate=cfg.lyap_aggregate,
        )
    return terms


_WEIGHTS = ("spec", "e_single", "e_multi", "jac_frob", "jac_spec", "lyap")


@torch.no_grad()
def evaluate(
    net: SudokuNet,
    data: Dict[str, Tuple[Tensor, Tensor]],
    steps=(16, 32, 64),
    batch_size: int = 500,
    splits=("test_id", "test_ood"),
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Board and cell accuracy per split and per number of recurrent steps T (test-time scaling).

    Returns {split: {str(T): {"board": ..., "cell": ...}}}."""
    net.eval()
    dev = net.pos.device
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for split in splits:
        P, S = data[split]
        out[split] = {}
        for T in steps:
            nb = cb = nblank = 0
            for i in range(0, len(P), batch_size):
                p, s = P[i : i + batch_size].to(dev), S[i : i + batch_size].to(dev)
                acc = accuracy(net(p, steps=T), p, s)
                blank = int((p == 0).sum())
                nb += acc["board"] * len(p)
                cb += acc["cell"] * blank
                nblank += blank
            out[split][str(T)] = {"board": nb / len(P), "cell": cb / max(1, nblank)}
    net.train()
    return out


def lyapunov_of(net: SudokuNet, puzzles: Tensor, horizon: int = 16) -> Dict[str, Any]:
    """The paper's finite-horizon exponents (T = 16 from X0) of the trained core on a few boards, in float64:
    per board the max and the mean of the non-trivial exponents (dense product when S*D <= 1024)."""
    import inspect

    from ..analysis.lyapunov import finite_time_lyapunov

    core = R.plain_copy(net.core).double().cpu()
    X0, C = net.inputs(puzzles.to(net.pos.device))
    X0, C = X0.detach().double().cpu(), C.detach().double().cpu()
    kw = {"horizon": horizon} if "horizon" in inspect.signature(finite_time_lyapunov).parameters else {"T": horizon}
    n = X0.shape[1] * X0.shape[2]
    maxs, means = [], []
    with torch.no_grad():
        for b in range(X0.shape[0]):
            res = finite_time_lyapunov(core, X0[b], C=C[b], k=None if n <= 1024 else 32, **kw)
            maxs.append(float(res.max))
            means.append(float(res.mean))
    return {
        "max": float(np.mean(maxs)),
        "mean": float(np.mean(means)),
        "per_board_max": maxs,
        "per_board_mean": means,
        "horizon": horizon,
        "boards": len(maxs),
        "method": "dense (all exponents)" if n <= 1024 else "matrix-free top 32",
    }


@torch.no_grad()
def heldout_lambda_max(
    net: SudokuNet, puzzles: Tensor, horizon: int = 16, k: int = 4, iters: int = 2
) -> Dict[str, Any]:
    """The finite-horizon lambda_max (T = ``horizon`` from X0) of the core on held-out ``puzzles`` [B, S], by
    :func:`fastjac.train.regularizers.lyapunov` with ``iters`` alignment passes in float64 (the per-epoch log;
    no random draw from torch's global generator). Returns {"max": mean over boards, "se": its standard error,
    "boards": B, "per_board": [...]}."""
    core = R.plain_copy(net.core).double()
    X0, C = net.inputs(puzzles.to(net.pos.device))
    ex = R.lyapunov(core, X0.detach().double(), C=C.detach().double(), horizon=horizon, k=k, iters=iters, seed=0)
    per = ex[:, 0].cpu().numpy()
    se = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")
    return {"max": float(per.mean()), "se": se, "boards": len(per), "per_board": [float(v) for v in per]}


def _save_ckpt(path: str, state: Dict[str, Any]) -> None:
    save_atomic(path, state)  # a failed or cut-off write leaves the previous checkpoint and no .tmp behind


def _log(path: str, rec: Dict[str, Any]) -> int:
    """Append one strict-JSON line (one write call); returns the log's size after it."""
    with open(path, "a") as f:
        f.write(json_text(rec, indent=None) + "\n")
        return f.tell()


def _ema_update(ema: Dict[str, Tensor], net: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped :func:`train` at the end of a step, after checkpointing that step: the
    same call again resumes bit for bit. ``signum``: the signal; ``step``: the steps done; ``saved``: whether the
    checkpoint of ``step`` was written (False only when the disk refused it)."""

    def __init__(self, signum: int, step: int, saved: bool):
        super().__init__(f"training stopped by signal {signum} after step {step}")
        self.signum, self.step, self.saved = signum, step, saved


class TrainingDiverged(NonFiniteError):
    """The loss (or the weights) of a training run became NaN/inf; the last good checkpoint is kept."""


@contextlib.contextmanager
def _deferred_signals():
    """While training, SIGINT and SIGTERM only note their arrival; the loop finishes the step it is in (a step is
    never cut between the optimiser step, the EMA update and the step counter) and then stops with a checkpoint.
    A second SIGINT raises KeyboardInterrupt at once (the checkpoint on disk is then the last one written).
    Outside the main thread signals cannot be caught; nothing is installed there."""
    got: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)

    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _start_over(out: str) -> str:
    return f"run with --fresh to start over (API: train(cfg, fresh=True)), delete {out!r}, or pass another --out"


def _load_checkpoint(path: str, cfg: TrainConfig, fp: str) -> Dict[str, Any]:
    """The checkpoint of this run, read without unpickling, or a ValueError saying what is wrong with it (and,
    for one written by other settings, which settings changed)."""
    if os.path.isdir(path):
        raise ValueError(f"out: {path!r} is a folder, not a checkpoint file; {_start_over(cfg.out)}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"out: the checkpoint {path!r} is empty (a write was cut off?); {_start_over(cfg.out)}")
    try:
        saved = torch.load(path, map_location=cfg.device, weights_only=True)
    except Exception as e:  # truncated / random bytes / a pickle with objects weights_only refuses
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ValueError(
            f"out: {path!r} is not a readable training checkpoint (corrupt or truncated: "
            f"{type(e).__name__}: {why}); nothing in it was run. {_start_over(cfg.out)}"
        ) from None
    keys = ("fingerprint", "model", "optimizer", "step", "train_time", "history")
    if (
        not isinstance(saved, dict)
        or any(k not in saved for k in keys)
        or not isinstance(saved["model"], dict)
        or isinstance(saved["step"], bool)
        or not isinstance(saved["step"], int)
    ):
        raise ValueError(
            f"out: {path!r} is not a training checkpoint of this fastjac version (a "
            f"{type(saved).__name__}); {_start_over(cfg.out)}"
        )
    if saved["fingerprint"] != fp:
        old = saved.get("config") if isinstance(saved.get("config"), dict) else {}
        new = cfg.to_dict()
        changed = [
            f"{k} {old.get(k, '(unset)')!r} -> {v!r}"
            for k, v in new.items()
            if k not in _NON_TRAJECTORY and old.get(k, "(unset)") != v
        ]
        what = ("; changed: " + ", ".join(changed)) if changed else ""
        raise ValueError(
            f"out: {path!r} was written by a run with other settings{what}. Resume with the old "
            f"settings, or {_start_over(cfg.out)}"
        )
    return saved


def _truncate(path: str, size: Optional[int]) -> None:
    """Cut the log back to what it held when the checkpoint was written (steps after it are redone)."""
    if size is None or not os.path.isfile(path) or os.path.getsize(path) <= size:
        return
    with open(path, "r+b") as f:
        f.truncate(size)


def save_net(net: SudokuNet, path: str, info: Optional[Dict[str, Any]] = None) -> None:
    """The whole Sudoku model as one safetensors file (weights + JSON config in the metadata)."""
    from ..models import _write_safetensors

    n = plain_net(net)
    meta = {"fastjac_sudoku_config": json.dumps(n.config()), "fastjac_core_config": json.dumps(n.core.config())}
    if info:
        meta["info"] = json.dumps(info)
    _write_safetensors({k: v.detach().contiguous().cpu() for k, v in n.state_dict().items()}, path, meta)


def plain_net(net: SudokuNet) -> SudokuNet:
    """A copy of ``net`` whose core carries no parametrisation (E-multi's), with the current weights."""
    c = net.config()
    new = SudokuNet(
        c["kind"],
        size=c["size"],
        dim=c["dim"],
        heads=c["heads"],
        steps=c["steps"],
        osc_dim=c["osc_dim"],
        dtype=net.pos.dtype,
        seed=c["seed"],
    )
    core = R.plain_copy(net.core)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("core.")}
    sd.update({"core." + k: v for k, v in core.state_dict().items()})
    new.load_state_dict(sd)
    return new.to(net.pos.device)


def load_net(path: str, dtype: torch.dtype = torch.float32, *, max_gb: Optional[float] = None) -> SudokuNet:
    """Load a model written by :func:`save_net` (no code in the file runs). Its config, size (the core's, against
    ``max_gb`` / ``FASTJAC_MODEL_LIMIT_GB``), tensor names, shapes and dtype are checked before anything is built;
    a bad file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    from ..models import _check_tensors, _file_dtype, _flat_config, _tensor_infos, check_model_size

    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            infos = _tensor_infos(path, f)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"path: {path!r} is not a safetensors file ({e})") from None
    if "fastjac_sudoku_config" not in meta:
        raise ValueError(f"path: {path!r} is not a fastjac Sudoku model (no fastjac_sudoku_config metadata)")
    cfg = _flat_config(path, meta["fastjac_sudoku_config"], "fastjac_sudoku_config")
    _file_dtype(path, infos)
    try:
        kind = cfg["kind"]
        check_model_size(
            cfg["dim"],
            cfg["heads"],
            osc_dim=cfg.get("osc_dim", 4) if kind == "akorn" else None,
            dtype=dtype,
            limit_gb=max_gb,
            what=f"Sudoku {kind} core",
        )
        net = SudokuNet(
            kind,
            size=cfg["size"],
            dim=cfg["dim"],
            heads=cfg["heads"],
            steps=cfg["steps"],
            osc_dim=cfg.get("osc_dim", 4),
            dtype=dtype,
            seed=cfg.get("seed", 0),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"path: {path!r} has a Sudoku config SudokuNet refuses: {e}") from None
    _check_tensors(path, net, infos)
    with safe_open(path, framework="pt", device="cpu") as f:
        net.load_state_dict({k: f.get_tensor(k).to(dtype) for k in f.keys()})
    return net


def train(cfg: TrainConfig, data=None, *, fresh: bool = False) -> Dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the results dict also written to results.json.

    A checkpoint in ``cfg.out`` written by the same settings is resumed (``log.jsonl`` is cut back to what it held
    then, so no step is logged twice); one written by other settings is refused (ValueError naming the changed
    settings); ``fresh=True`` deletes the checkpoint, the log and the results first. ``stop_at > 0`` stops after
    that many optimizer steps with a checkpoint (for time-limited jobs and the resume test); the next call continues.

    Safety: ``cfg.out`` is proved writable before anything is computed. SIGINT (Ctrl-C) and SIGTERM end the step
    in progress, checkpoint it and raise :class:`TrainingInterrupted` (a KeyboardInterrupt): the same call again
    ends with the weights of an uninterrupted run, bit for bit. A write that fails later (full disk) warns and
    the run goes on; the result files then go to the temp folder (``res["files"]`` says where). A NaN/inf loss or
    gradient stops the run with :class:`TrainingDiverged` (a ValueError) before it touches the weights, keeping
    the last good checkpoint.
    """
    cfg = cfg.validate()
    check_out_dir(cfg.out, "out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    if fresh:
        for name in ("checkpoint.pt", "checkpoint.pt.tmp", "log.jsonl", "results.json"):
            if os.path.isfile(os.path.join(cfg.out, name)):
                os.remove(os.path.join(cfg.out, name))
    fp = _fingerprint(cfg)
    saved = _load_checkpoint(ckpt_path, cfg, fp) if os.path.lexists(ckpt_path) else None  # before the data
    t_start = time.perf_counter()
    data = data if data is not None else load_data(cfg)
    t_data = time.perf_counter() - t_start
    Ptr, Str = data["train"]
    net = build_net(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()} if cfg.ema > 0 else None
    per_epoch = math.ceil(len(Ptr) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    st = dict(step=0, train_time=0.0, history=[], log_bytes=0, heldout=[])
    if saved is not None:
        try:
            net.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if saved.get("spec_state"):
                R.load_spec_state(net.core, saved["spec_state"])
            if ema is not None:
                ema = saved["ema"]
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"out: {ckpt_path!r} does not fit this run's model ({str(e).splitlines()[0][:160]}); "
                f"{_start_over(cfg.out)}"
            ) from None
        st = dict(
            step=saved["step"],
            train_time=saved["train_time"],
            history=saved["history"],
            log_bytes=saved.get("log_bytes"),
            heldout=saved.get("heldout", []),
        )
        _truncate(log_path, st["log_bytes"])  # lines of steps after the checkpoint: they are redone now
    elif os.path.isfile(log_path):
        _truncate(log_path, 0)  # a run from step 0: the log of an earlier run in this folder goes
    last = dict(saved_step=st["step"] if saved is not None else None, ckpt_failed=False, log_failed=False)

    def checkpoint() -> bool:
        """Write the checkpoint of the current (consistent) state; False when the disk refused it."""
        for k, v in net.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise TrainingDiverged(
                    f"training diverged: the weight {k} holds NaN/inf after step {st['step']}; {_kept()}"
                )
        try:
            _save_ckpt(
                ckpt_path,
                dict(
                    fingerprint=fp,
                    model=net.state_dict(),
                    optimizer=opt.state_dict(),
                    spec_state=R.spec_state(net.core),
                    ema=ema,
                    step=st["step"],
                    train_time=st["train_time"],
                    history=st["history"],
                    config=cfg.to_dict(),
                    log_bytes=st["log_bytes"],
                    heldout=st["heldout"],
                ),
            )
        except OSError as e:  # a full disk must not cost the run: warn, go on, and try again at the next one
            if not last["ckpt_failed"]:
                warnings.warn(
                    f"train: could not write the checkpoint {ckpt_path!r} ({e.strerror or e}); the run "
                    f"goes on (it cannot be resumed from this step)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            last["ckpt_failed"] = True
            return False
        last["saved_step"] = st["step"]
        return True

    def _kept() -> str:
        where = (
            f"the last good checkpoint (step {last['saved_step']}) is kept in {ckpt_path!r}"
            if last["saved_step"] is not None
            else "no checkpoint was written"
        )
        return (
            f"{where}. Lower --lr, raise --warmup or set --clip, then run with --fresh (the same settings "
            f"would diverge again)"
        )

    def log(rec: Dict[str, Any]) -> None:
        try:
            st["log_bytes"] = _log(log_path, rec)
        except OSError as e:  # the records stay in the checkpoint's history and in results.json
            if not last["log_failed"]:
                warnings.warn(
                    f"train: could not write {log_path!r} ({e.strerror or e}); the run goes on (the "
                    f"log records are kept in results.json)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            last["log_failed"] = True

    from tqdm.auto import tqdm

    stop = cfg.stop_at if cfg.stop_at > 0 else total
    bar = tqdm(total=total, initial=st["step"], disable=not cfg.progress, desc="train", unit="step")
    net.train()
    last_terms: Dict[str, float] = {}
    mutating = False  # True between opt.step() and the step counter: a state that no checkpoint may hold
    try:
        with _deferred_signals() as got:
            while st["step"] < min(total, stop) and not got:
                step = st["step"]
                epoch, j = divmod(step, per_epoch)
                perm = torch.randperm(len(Ptr), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
                idx = perm[j * cfg.batch_size : (j + 1) * cfg.batch_size]
                p, s = Ptr[idx].to(cfg.device), Str[idx].to(cfg.device)
                t0 = time.perf_counter()
                for gr in opt.param_groups:
                    gr["lr"] = _lr_at(cfg, step, total)
                logits, xs, C = net(p, return_states=True)
                ce = sudoku_loss(logits, s)
                ramp = R.ramp_weight(step, warmup=cfg.reg_warmup, ramp=cfg.reg_ramp)
                terms = regularizer_terms(cfg, net, xs, C, step) if ramp > 0 else {}
                last_terms.update({k: v.item() for k, v in terms.items()})
                loss = ce + sum(ramp * getattr(cfg, k) * v for k, v in terms.items())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip) if cfg.clip > 0 else None
                bad = [
                    n
                    for n, v in (("loss", loss), ("gradient norm", gnorm))
                    if v is not None and not bool(torch.isfinite(v))
                ]
                if bad:  # before opt.step: the weights and the checkpoint stay those of the last good step
                    val = float((loss if bad[0] == "loss" else gnorm).detach())
                    raise TrainingDiverged(
                        f"training diverged at step {step + 1}: the {bad[0]} is {val} (lr "
                        f"{opt.param_groups[0]['lr']:g}, ce {ce.item()}, terms {last_terms}); "
                        f"{_kept()}"
                    )
                # from here to the step counter the state is that of no step: an exception in between (a second
                # Ctrl-C, a kill) writes no checkpoint, the resume redoes the step from the last one on disk
                mutating = True
                opt.step()
                if ema is not None:
                    _ema_update(ema, net, cfg.ema)
                st["train_time"] += time.perf_counter() - t0
                done = step + 1
                if done % cfg.log_every == 0 or done == total:
                    rec = dict(
                        step=done,
                        epoch=epoch,
                        loss=loss.item(),
                        ce=ce.item(),
                        lr=opt.param_groups[0]["lr"],
                        grad_norm=None if gnorm is None else float(gnorm),
                        **last_terms,
                    )  # the latest value of each term (with reg_every > 1: of a past step)
                    log(rec)
                    st["history"].append(rec)
                    bar.set_postfix(ce=f"{ce.item():.3f}")
                if cfg.lyap_log_boards and done % per_epoch == 0:  # after its optimizer time: not in train_time
                    hl = heldout_lambda_max(net, data["test_id"][0][: cfg.lyap_log_boards], horizon=cfg.steps)
                    hl = dict(step=done, epoch=epoch, heldout_lambda_max=hl["max"], se=hl["se"], boards=hl["boards"])
                    st["heldout"].append(hl)
                    log(hl)
                if cfg.eval_every and done % (cfg.eval_every * per_epoch) == 0 and done < total:
                    ev = evaluate(net, data, steps=(cfg.steps,))
                    log(dict(step=done, eval=ev))
                st["step"] = done
                mutating = False
                bar.update(1)
                if st["step"] % cfg.checkpoint_every == 0 or st["step"] == stop:
                    checkpoint()
            if got:
                ok = last["saved_step"] == st["step"] or checkpoint()
                raise TrainingInterrupted(got[0], st["step"], ok)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, or one from where signals are not caught
        if not mutating and last["saved_step"] != st["step"]:
            checkpoint()  # the state is that of the end of step st["step"]: consistent
        raise
    finally:
        bar.close()
    if st["step"] < total:
        return dict(stopped_at=st["step"], total_steps=total, out=cfg.out)
    if last["saved_step"] != total:
        checkpoint()
    if ema is not None:
        net.load_state_dict(ema)
    t_eval = time.perf_counter()
    ev = evaluate(net, data, steps=cfg.eval_steps)
    lyap = lyapunov_of(net, data["test_id"][0][: cfg.lyap_samples], horizon=cfg.steps) if cfg.lyap_samples else None
    t_eval = time.perf_counter() - t_eval
    from ..models import save_model

    core = R.plain_copy(net.core)
    files = dict(
        model=write_with_fallback(
            os.path.join(cfg.out, "model.safetensors"), lambda tmp: save_model(core, tmp), "model"
        ),
        sudoku_net=write_with_fallback(
            os.path.join(cfg.out, "sudoku_net.safetensors"), lambda tmp: save_net(net, tmp), "sudoku_net"
        ),
    )
    res = dict(
        config=cfg.to_dict(),
        steps=total,
        train_time_s=st["train_time"],
        data_time_s=t_data,
        eval_time_s=t_eval,
        final_ce=st["history"][-1]["ce"] if st["history"] else None,
        eval=ev,
        lyapunov=lyap,
        heldout_lambda_max_per_epoch=st["heldout"],
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if last["log_failed"]:
        res["history"] = st["history"]  # the log could not be written: its records are kept here
    files["results"] = write_json(os.path.join(cfg.out, "results.json"), res, "train_results")
    log(dict(step=total, eval=ev, lyapunov=lyap))
    files["log"] = None if last["log_failed"] else log_path
    files["checkpoint"] = ckpt_path if last["saved_step"] == total else None
    res["files"] = files
    return res


__all__ = [
    "TrainConfig",
    "PRESETS",
    "train",
    "TrainingInterrupted",
    "TrainingDiverged",
    "evaluate",
    "build_net",
    "load_data",
    "lyapunov_of",
    "save_net",
    "load_net",
    "plain_net",
    "regularizer_terms",
    "heldout_lambda_max",
]
