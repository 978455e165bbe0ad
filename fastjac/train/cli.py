"""``python -m fastjac train``: train a Sudoku ItrSA/AKOrN with any combination of regularisers.

    python -m fastjac train --preset cpu                         # 4x4 boards, minutes on 2 CPU cores
    python -m fastjac train --preset cpu --kind akorn --spec 1e-4 --out runs/akorn_spec
    python -m fastjac train --preset cpu --lyap 0.1 --lyap-target 0.1
    python -m fastjac train --preset cpu --lyap 0.3 --lyap-target 0.1 --lyap-form above --reg-warmup 250
    python -m fastjac train --preset paper --device cuda         # 9x9, D = 512, H = 8, batch 100, 100 epochs

Every field of :class:`fastjac.train.loop.TrainConfig` is a flag (``--batch-size``, ``--jac-frob``, ...); a preset
sets defaults that explicit flags override. The same command again resumes from ``OUT/checkpoint.pt``
(``--fresh`` starts over). Results: ``OUT/results.json``, ``OUT/log.jsonl``, ``OUT/model.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import List, Optional

from .loop import PRESETS, TrainConfig, TrainingInterrupted, train

_HELP = {
    "kind": "itrsa | akorn",
    "size": "board side: 4, 6 (2x3 boxes) or 9",
    "dim": "D",
    "heads": "H",
    "steps": "T, recurrent steps",
    "spec": "weight of R_Spec",
    "e_single": "weight of E-single",
    "e_multi": "weight of E-multi's symmetry penalty (with the orthogonal parametrisation of W^V, W^O)",
    "e_multi_hard": "E-multi with exact constraints",
    "jac_frob": "weight of the Hutchinson |J|_F^2",
    "jac_spec": "weight of sigma_max(J)^2",
    "lyap": "weight of (lambda_max - target)^2",
    "lyap_target": "target finite-horizon lambda_max",
    "ema": "EMA decay of the weights (0: off)",
    "clip": "gradient-norm clip (0: off)",
    "eval_steps": "T values of the final evaluation",
    "stop_at": "stop after this many steps (checkpointed)",
    "reg_samples": "boards per batch the Jacobian regularisers use",
    "threads": "torch threads (0: default)",
    "lyap_iters": "alignment passes of the Lyapunov frame (1: unbiased lambda_max; 0: random frame, biased low)",
    "lyap_form": "squared | above | below (one-sided hinges)",
    "lyap_aggregate": "board | batch (penalise the mean)",
    "lyap_boards": "boards per step for the Lyapunov term (0: reg-samples)",
    "reg_warmup": "steps with every regulariser off (-1: 10 %% of the steps with --lyap, else 0)",
    "reg_ramp": "steps of linear weight ramp after the warm-up (-1: 10 %% of the steps with --lyap, else 0)",
    "lyap_log_boards": "held-out boards whose lambda_max is logged each epoch (0: off)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastjac train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults to start from (default: cpu)")
    p.add_argument("--fresh", action="store_true", help="start over: delete OUT's checkpoint, log and results first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        h = _HELP.get(f.name, "") + " (preset default)"
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.name == "eval_steps":
            p.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=h)
    return p


def _as_flag(msg: str) -> str:
    """A config error ``"log_every: ..."`` as the flag the user typed: ``"--log-every: ..."``."""
    name, sep, rest = msg.partition(": ")
    if sep and name in {f.name for f in dataclasses.fields(TrainConfig)}:
        return f"--{name.replace('_', '-')}: {rest}"
    return msg


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.quiet:
        over["progress"] = False
    try:
        cfg = TrainConfig.preset(args.preset, **over).validate()
    except (TypeError, ValueError) as e:
        print(f"error: {_as_flag(str(e))}", file=sys.stderr)
        return 2
    print(
        f"training {cfg.kind} on {cfg.size}x{cfg.size} Sudoku: D={cfg.dim}, H={cfg.heads}, T={cfg.steps}, "
        f"{cfg.epochs} epochs of {cfg.n_train} boards, batch {cfg.batch_size}; out: {cfg.out}"
    )
    try:
        res = train(cfg, fresh=args.fresh)
    except TrainingInterrupted as e:
        name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(e.signum, f"signal {e.signum}")
        if e.saved:
            print(
                f"\ninterrupted ({name}) after step {e.step}: checkpointed; run the same command again to resume",
                file=sys.stderr,
            )
        else:
            print(
                f"\ninterrupted ({name}) after step {e.step}: the checkpoint could not be written (see the "
                f"warning); a resume starts from the last one written",
                file=sys.stderr,
            )
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the last checkpoint written is kept; run the same command again to resume", file=sys.stderr
        )
        return 130
    except (ValueError, TypeError) as e:
        print(f"error: {_as_flag(str(e))}", file=sys.stderr)
        return 2
    if "stopped_at" in res:
        print(f"stopped at step {res['stopped_at']} of {res['total_steps']} (checkpointed; run again to resume)")
        return 0
    ev = res["eval"]
    for split in ev:
        print(
            f"{split:9s} "
            + "  ".join(f"T={t}: board {v['board']:.3f} cell {v['cell']:.3f}" for t, v in ev[split].items())
        )
    if res.get("lyapunov"):
        ly = res["lyapunov"]
        print(
            f"finite-horizon Lyapunov (T={ly['horizon']}, {ly['boards']} boards): max {ly['max']:.4f}, "
            f"mean {ly['mean']:.4f}"
        )
    print(f"train time {res['train_time_s']:.1f} s; results: {res['files']['results']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
