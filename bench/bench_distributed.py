"""Benchmark: steps per second of fastjac.distributed against the world size, and the token-parallel mode's
communication per step per rank against its FLOPs per step per rank.

    python bench/bench_distributed.py                          # world sizes 1, 2, 4 on this machine (gloo, CPU)
    python bench/bench_distributed.py --world 1,2 --threads 1 --tokens-size 512x64x4 --k 16 --steps 8

Each world size is launched as P processes on 127.0.0.1 (MASTER_ADDR/PORT, RANK, WORLD_SIZE: what torchrun sets)
with ``--threads`` torch threads each, so P * threads cores are asked for: on a 2-core machine P = 4 is
oversubscribed and its "efficiency" measures that, not the algorithm. On a GPU machine the workers use NCCL, one
GPU per rank. Per mode and world size: wall time of ``steps`` Benettin steps (after a warm-up run), steps/s,
scaling efficiency ``rate_P / (P rate_1)`` (tokens: one input; samples: a fixed batch), the bytes each rank handed to
torch.distributed per step (measured by fastjac.distributed.STATS) and the model FLOPs per step per rank. The
exponents of every world size are checked against world size 1 (max abs difference < 1e-8, float64) and the
efficiency is reported only when they agree. Results: bench/results/distributed_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def _parse_size(s):
    S, D, H = (int(x) for x in s.split("x"))
    return S, D, H


def _worker(cfg: dict) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    import fastjac as fj
    from fastjac.distributed import STATS, reset_stats, shard_bounds
    from fastjac.distributed.tokens import jvp_flops

    torch.set_num_threads(cfg["threads"])
    nccl = torch.cuda.is_available()
    if nccl:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=600))
    r, P = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    dt = torch.float64
    mode = cfg["mode"]
    S, D, H = cfg["size"]
    B = cfg["samples"] if mode == "samples" else 1
    torch.manual_seed(0)
    model = fj.ItrSA(D, H, norm="l2", dtype=dt, device=dev)
    g = torch.Generator().manual_seed(1)
    X0 = torch.randn(B, S, D, generator=g, dtype=dt).to(dev)
    C = torch.randn(B, S, D, generator=g, dtype=dt).to(dev)
    if mode == "tokens":
        X0, C = X0[0], C[0]
    k, steps = cfg["k"], cfg["steps"]
    run = lambda n: fj.lyapunov_spectrum(model, X0, C=C, k=k, steps=n, progress=False, parallel=mode)  # noqa
    run(2)  # warm-up
    dist.barrier()
    reset_stats()
    t0 = time.perf_counter()
    res = run(steps)
    if nccl:
        torch.cuda.synchronize()
    dist.barrier()
    wall = time.perf_counter() - t0
    lo, hi = shard_bounds(S if mode == "tokens" else B, P, r)
    if mode == "tokens":
        Sp, nb = hi - lo, 1
    else:
        Sp, nb = S, hi - lo
    dh = dv = model.head_dim
    flops = jvp_flops(Sp, S, D, H, dh, dv, k, B=nb) + nb * 6 * Sp * D * k * k  # + CholeskyQR2 (2 Grams, 1 apply)
    row = dict(
        rank=r,
        wall_s=wall,
        steps=steps,
        bytes_per_step=sum(v for key, v in STATS.items() if key.endswith("bytes")) / steps,
        p2p_bytes_per_step=STATS["p2p_bytes"] / steps,
        allreduce_bytes_per_step=STATS["allreduce_bytes"] / steps,
        flops_per_step=flops,
        exponents=res.exponents.cpu().reshape(-1).tolist(),
    )
    with open(os.path.join(cfg["out"], f"rank{r}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def _launch(cfg: dict, P: int, timeout: float) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(cfg["out"], exist_ok=True)
    procs = []
    for r in range(P):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(r),
            WORLD_SIZE=str(P),
            LOCAL_RANK=str(r),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS=str(cfg["threads"]),
        )
        procs.append(
            subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)], env=env)
        )
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed: {[p.returncode for p in procs]}")
    rows = []
    for r in range(P):
        with open(os.path.join(cfg["out"], f"rank{r}.json")) as f:
            rows.append(json.load(f))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--world", default="1,2,4")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--tokens-size", default="768x64x4", help="SxDxH of the token-parallel input")
    ap.add_argument("--samples-size", default="81x64x4", help="SxDxH of each sample (sample-parallel)")
    ap.add_argument("--samples", type=int, default=8, help="batch of the sample-parallel runs")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/distributed_<device>.json)")
    args = ap.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    import tempfile

    import torch
    from machine import machine_info

    worlds = [int(x) for x in args.world.split(",")]
    results = dict(
        machine=machine_info(),
        load_before=os.getloadavg(),
        threads_per_rank=args.threads,
        k=args.k,
        steps=args.steps,
        dtype="float64",
        runs=[],
    )
    tmp = tempfile.mkdtemp(prefix="fj_bench_dist_")
    for mode, size in (("tokens", args.tokens_size), ("samples", args.samples_size)):
        base = None
        for P in worlds:
            cfg = dict(
                mode=mode,
                size=_parse_size(size),
                samples=args.samples,
                k=args.k,
                steps=args.steps,
                threads=args.threads,
                out=os.path.join(tmp, f"{mode}{P}"),
            )
            rows = _launch(cfg, P, args.timeout)
            wall = max(x["wall_s"] for x in rows)
            rate = args.steps / wall
            ex = rows[0]["exponents"]
            if base is None:
                base = dict(rate=rate, ex=ex, P=P)
            err = max(abs(a - b) for a, b in zip(ex, base["ex"]))
            ok = err < 1e-8 and all(x["exponents"] == ex for x in rows)
            eff = (rate / base["rate"]) * base["P"] / P if ok else None
            r0 = rows[0]
            row = dict(
                mode=mode,
                world_size=P,
                size=size,
                batch=args.samples if mode == "samples" else 1,
                wall_s=wall,
                steps_per_s=rate,
                efficiency=eff,
                results_match=ok,
                max_abs_diff_vs_first=err,
                bytes_per_step_per_rank=max(x["bytes_per_step"] for x in rows),
                p2p_bytes_per_step_rank0=r0["p2p_bytes_per_step"],
                allreduce_bytes_per_step_rank0=r0["allreduce_bytes_per_step"],
                flops_per_step_per_rank=max(x["flops_per_step"] for x in rows),
            )
            row["flops_per_byte"] = (
                row["flops_per_step_per_rank"] / row["bytes_per_step_per_rank"]
                if row["bytes_per_step_per_rank"]
                else None
            )
            results["runs"].append(row)
            e = f"{eff:.2f}" if eff is not None else "n/a"
            print(
                f"{mode:8s} P={P}  {size:>10s}  {rate:7.3f} steps/s  efficiency {e:>5s}  "
                f"{row['bytes_per_step_per_rank'] / 1e6:8.2f} MB/step/rank  "
                f"{row['flops_per_step_per_rank'] / 1e9:8.3f} GFLOP/step/rank  match={ok}",
                flush=True,
            )
    results["load_after"] = os.getloadavg()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.out or os.path.join(HERE, "results", f"distributed_{dev}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
