"""The sharded main job: ``torchrun --nproc_per_node=N -m fastjac --parallel {samples,tokens} [options]``.

It takes the options of ``python -m fastjac`` and builds the same model and state on every rank, with the main
job's set-up (``fastjac.cli.common``), output-folder check (before any compute) and strict JSON writer with its
fallback (``fastjac._io``). Rank 0 alone writes ``<out>/lyapunov.json`` and ``<out>/lyapunov.png``.

- ``--parallel tokens``: the main job's one input is sharded by tokens: with default options the shipped trained
  model on its puzzle (S = 16), exactly the single-process ``python -m fastjac`` run; with --model/--tokens/...
  that model and state. The result equals the single-process result to rounding.
- ``--parallel samples``: a batch of N inputs sharded by samples. N is the environment variable
  ``FASTJAC_SAMPLES`` (default: the world size; the parser is shared with the single-process job, so there is no
  flag for it). The trained default has one puzzle input, so samples mode runs the random ItrSA (D = 64, S = 81)
  unless --model is given, and says so: sample 0 is that model's main-job input and sample b draws its X0 and C as
  the main job does with ``--seed`` + b, on the same model (seeded by ``--seed``). The JSON holds every sample's
  exponents; the PNG shows sample 0.

Checkpoints: ``<out>/lyapunov_<mode>.ckpt.rank<r>-of<P>.step<t>``, one file per rank (each rank its own shard),
every ``--checkpoint-every`` steps; the same command resumes (with the same world size: another one is refused);
``--fresh`` deletes them first. A checkpoint that cannot be written at the end only warns: the result is written.
Without torchrun's environment the job runs as a single rank (gloo on 127.0.0.1).
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import time

import torch

from .._io import check_out_dir
from .common import env_int, make_model_and_state, random_state, result_line


def _init():
    """Initialise the default group from torchrun's environment (or as one local rank); returns (created, device)."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        created = True
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return created, dev


def _batch(args, model, X0, C, n: int):
    """n inputs: sample b is the main job's state drawn with seed + b (sample 0 is the main job's own)."""
    xs, cs = [X0], [C]
    for b in range(1, n):
        a = copy.copy(args)
        a.seed = args.seed + b
        Xb, Cb = random_state(model, a)
        xs.append(Xb)
        cs.append(Cb)
    return torch.stack(xs), torch.stack(cs)


def _agree_ok(ok: bool) -> bool:
    """Whether every rank's check passed (so that all ranks stop together, none waits in a collective)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def run_parallel(args) -> int:
    """Run the main job sharded (``args.parallel`` in {"samples", "tokens"}); returns the exit code."""
    import torch.distributed as dist

    from ..analysis.lyapunov import lyapunov_spectrum
    from ..distributed import STATS, reset_stats
    from ..distributed.engine import clear_checkpoints
    from .lyapunov import write_outputs

    if args.job != "lyapunov":
        print(f"fastjac: --parallel runs the lyapunov job only, not {args.job!r}", file=sys.stderr)
        return 2
    mode = args.parallel
    try:  # the checks that need no process group come first
        n = env_int("FASTJAC_SAMPLES", 0) if mode == "samples" else None
    except ValueError as e:
        print(f"fastjac: {e}", file=sys.stderr)
        return 2
    created, dev = _init()
    r, P = dist.get_rank(), dist.get_world_size()
    try:
        err = None
        try:
            model, X0, C = make_model_and_state(args, allow_trained=mode == "tokens")
            check_out_dir(args.out)  # before any compute, on every rank (a late failure would lose the run)
        except (ValueError, TypeError) as e:
            err = e
        if not _agree_ok(err is None):
            if err is not None:
                raise err
            raise ValueError("--out or the model set-up failed on another rank; see its message")
        if mode == "samples":
            n = n or P
            X0, C = _batch(args, model, X0, C, n)
        model, X0, C = model.to(dev), X0.to(dev), C.to(dev)
        ckpt = os.path.join(args.out, f"lyapunov_{mode}.ckpt")
        if args.fresh:
            clear_checkpoints(ckpt, dist.group.WORLD)
        if r == 0:
            what = f"{n} samples" if mode == "samples" else f"S={args.tokens} tokens"
            note = ""
            if mode == "samples" and args.model_kind == "random":
                note = (
                    "\nsamples mode runs the random ItrSA (the trained default model has one puzzle input); "
                    "pass --model FILE for another model"
                )
            print(
                f"model ({args.model_kind}): {model}\n{mode}-parallel over {P} ranks ({dist.get_backend()}): "
                f"{what}, D={model.dim}; k={args.k} tangents, {args.steps} steps after {args.burn_in} burn-in "
                f"steps (checkpoints: {ckpt}.rank*){note}",
                flush=True,
            )
        reset_stats()
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
            parallel=mode,
        )
        dt = time.perf_counter() - t0
        if r == 0:
            print(result_line(res) + (" (sample 0)" if mode == "samples" else ""))
            js, png = write_outputs(
                res,
                args.out,
                dict(
                    wall_s_this_run=dt,
                    model=repr(model),
                    model_kind=args.model_kind,
                    parallel=mode,
                    world_size=P,
                    backend_dist=dist.get_backend(),
                    samples=n,
                    comm_bytes_rank0=dict(STATS),
                ),
            )
            print(f"wrote {js}" + (f" and {png}" if png else "") + f" in {dt:.1f} s")
        dist.barrier()
    except KeyboardInterrupt:
        print("\ninterrupted: the last periodic checkpoint is kept; run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ArithmeticError) as e:
        print(f"fastjac (rank {r}): {e}", file=sys.stderr)
        return 2
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    return 0
