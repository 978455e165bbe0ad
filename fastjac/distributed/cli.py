"""The sharded main job: ``torchrun --nproc_per_node=N -m fastjac --parallel {samples,tokens} [options]``.

It takes the options of ``python -m fastjac`` (``fastjac.__main__.build_parser``) and builds the same model and
state on every rank (seeded by ``--seed``). Rank 0 alone writes ``<out>/lyapunov.json`` and ``<out>/lyapunov.png``.

- ``--parallel tokens``: the main job's one input (S = ``--tokens``) is sharded by tokens; the result equals the
  single-process ``python -m fastjac`` result to rounding.
- ``--parallel samples``: a batch of N inputs sharded by samples. N is the environment variable
  ``FASTJAC_SAMPLES`` (default: the world size; the parser is shared with the single-process job, so there is no
  flag for it). Sample 0 is the single-process job's input; sample b draws its X0 and C exactly as the main job does
  with ``--seed`` + b, on the same model (seeded by ``--seed``). The JSON holds every sample's exponents; the PNG
  shows sample 0.

Checkpoints: ``<out>/lyapunov_<mode>.ckpt.rank<r>-of<P>.step<t>``, one file per rank (each rank its own shard),
every ``--checkpoint-every`` steps; the same command resumes (with the same world size: another one is refused);
``--fresh`` deletes them first. Without torchrun's environment the job runs as a single rank (gloo on 127.0.0.1).
"""
from __future__ import annotations

import copy
import os
import socket
import sys
import time

import torch
import torch.distributed as dist


def _init():
    """Initialise the default group from torchrun's environment (or as one local rank); returns (created, device)."""
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        created = True
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return created, dev


def _batch(args, model, X0, C, n: int):
    """n inputs: sample b is the main job's state drawn with seed + b (sample 0 is the main job's own)."""
    from .. import __main__ as main

    xs, cs = [X0], [C]
    for b in range(1, n):
        a = copy.copy(args)
        a.seed = args.seed + b
        Xb, Cb = main._state(model, a)
        xs.append(Xb)
        cs.append(Cb)
    return torch.stack(xs), torch.stack(cs)


def run_parallel(args) -> int:
    """Run the main job sharded (``args.parallel`` in {"samples", "tokens"}); returns the exit code."""
    from .. import __main__ as main
    from ..analysis.lyapunov import lyapunov_spectrum
    from . import STATS, reset_stats
    from .engine import clear_checkpoints

    if args.job != "lyapunov":
        print(f"fastjac: --parallel runs the lyapunov job only, not {args.job!r}", file=sys.stderr)
        return 2
    created, dev = _init()
    r, P = dist.get_rank(), dist.get_world_size()
    try:
        model, X0, C = main.make_model_and_state(args, allow_trained=False)
        mode = args.parallel
        n = None
        if mode == "samples":
            n = int(os.environ.get("FASTJAC_SAMPLES", P))
            if n < 1:
                raise ValueError(f"FASTJAC_SAMPLES: expected an int >= 1, got {n}")
            X0, C = _batch(args, model, X0, C, n)
        model, X0, C = model.to(dev), X0.to(dev), C.to(dev)
        os.makedirs(args.out, exist_ok=True)
        ckpt = os.path.join(args.out, f"lyapunov_{mode}.ckpt")
        if args.fresh:
            clear_checkpoints(ckpt, dist.group.WORLD)
        if r == 0:
            what = f"{n} samples" if mode == "samples" else f"S={args.tokens} tokens"
            print(f"model: {model}\n{mode}-parallel over {P} ranks ({dist.get_backend()}): {what}, D={model.dim}; "
                  f"k={args.k} tangents, {args.steps} steps after {args.burn_in} burn-in steps "
                  f"(checkpoints: {ckpt}.rank*)", flush=True)
        reset_stats()
        t0 = time.perf_counter()
        res = lyapunov_spectrum(model, X0, C=C, k=args.k, steps=args.steps, burn_in=args.burn_in, seed=args.seed,
                                checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                                progress=not args.quiet, backend=args.backend, parallel=mode)
        dt = time.perf_counter() - t0
        if r == 0:
            out = res.to_dict()
            out.update(wall_s_this_run=dt, model=repr(model), parallel=mode, world_size=P,
                       backend_dist=dist.get_backend(), samples=n, comm_bytes_rank0=dict(STATS))
            js = main._write_json(os.path.join(args.out, "lyapunov.json"), out, "lyapunov")  # strict, with a fallback
            png = os.path.join(args.out, "lyapunov.png")
            try:
                from ..plot.lyapunov import plot_lyapunov

                plot_lyapunov(res, png)
            except ImportError:
                png = None
                print("matplotlib is not installed: no plot (pip install 'fastjac[plot]')")
            mx = res.max if res.max.dim() == 0 else res.max[0]
            mu = res.mean if res.mean.dim() == 0 else res.mean[0]
            print(f"lambda_max = {mx:+.5f}   mean = {mu:+.5f}" + (" (sample 0)" if mode == "samples" else ""))
            print(f"wrote {js}" + (f" and {png}" if png else "") + f" in {dt:.1f} s")
        dist.barrier()
    except KeyboardInterrupt:
        print("\ninterrupted: the last periodic checkpoint is kept; run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        print(f"fastjac (rank {r}): {e}", file=sys.stderr)
        return 2
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    return 0


__all__ = ["run_parallel"]
