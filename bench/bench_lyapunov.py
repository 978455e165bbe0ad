"""Benchmark: steps per second of fastjac.lyapunov_spectrum against an autograd baseline, and the QR kernel.

    python bench/bench_lyapunov.py                       # CPU sizes (or the GPU sizes on a CUDA machine)
    python bench/bench_lyapunov.py --sizes 64x64x4 --k 32 --steps 20

Baseline (bench/baselines.py: ``lyapunov_autograd``): the same Benettin iteration written the way users do it
today: ``torch.func.vmap(torch.func.jvp)`` through the model's plain forward for the k tangents, plus
``torch.linalg.qr`` (Householder) every step, from the same initial tangents. Both run the same number of steps in
the same process; a size's speedup is reported only if both give the same exponents (max difference below 1e-3 in
float32, 1e-8 in float64). On CUDA the script also times ``fastjac.ops.qr`` (fused CholeskyQR2 kernels) against
``torch.linalg.qr`` on tall-skinny [S*D, k] matrices, with achieved GB/s (bytes = 3 reads of M + 1 write of Q, the
minimum of this algorithm). Results go to bench/results/lyapunov_<device>.json with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from baselines import lyapunov_autograd  # noqa: E402
from machine import machine_info  # noqa: E402

import fastjac as fj  # noqa: E402

CPU_SIZES = "64x64x4,81x64x4"
GPU_SIZES = "81x256x8,81x512x8,1024x256x8,1024x512x8,4096x256x8,4096x512x8"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, steps: int) -> float:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return (time.perf_counter() - t0) / steps, out


def bench_size(S, D, H, k, steps, dtype, device):
    torch.manual_seed(0)
    model = fj.ItrSA(D, H, norm="l2", dtype=dtype, device=device)
    X0 = torch.randn(S, D, dtype=dtype, device=device)
    C = torch.randn(S, D, dtype=dtype, device=device)
    row = dict(S=S, D=D, H=H, k=k, **{"S*D": S * D}, steps=steps, dtype=str(dtype).replace("torch.", ""))
    # warm-up (kernel compilation, allocator) on a few steps of each
    fj.lyapunov_spectrum(model, X0, C=C, k=k, steps=2, progress=False)
    lyapunov_autograd(model, X0, C, k, 2)
    t_fast, res = _timed(lambda: fj.lyapunov_spectrum(model, X0, C=C, k=k, steps=steps, progress=False), steps)
    try:
        t_base, ex_base = _timed(lambda: lyapunov_autograd(model, X0, C, k, steps), steps)
    except torch.OutOfMemoryError:
        row.update(fastjac_step_s=t_fast, baseline="out of memory")
        return row
    err = (res.exponents.cpu() - ex_base.cpu()).abs().max().item()
    ok = err < (1e-3 if dtype == torch.float32 else 1e-8)
    row.update(
        fastjac_step_s=t_fast,
        fastjac_steps_per_s=1 / t_fast,
        baseline_step_s=t_base,
        baseline_steps_per_s=1 / t_base,
        max_abs_diff_exponents=err,
        results_match=ok,
        speedup=(t_base / t_fast) if ok else None,
    )
    return row


def bench_qr(n, k, dtype):
    from triton.testing import do_bench

    M = torch.randn(n, k, dtype=dtype, device="cuda")
    t_fj = do_bench(lambda: fj.ops.qr(M)) * 1e-3
    t_hh = do_bench(lambda: torch.linalg.qr(M)) * 1e-3
    Q, logd = fj.ops.qr(M)
    Qh, R = torch.linalg.qr(M.double())
    err = (logd - R.diagonal().abs().log()).abs().max().item()
    byts = 4 * n * k * M.element_size()
    return dict(
        n=n,
        k=k,
        dtype=str(dtype).replace("torch.", ""),
        fastjac_qr_s=t_fj,
        torch_linalg_qr_s=t_hh,
        speedup=t_hh / t_fj,
        fastjac_GBps=byts / t_fj / 1e9,
        bytes_formula="4*n*k*elsize",
        max_abs_err_logdiag=err,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--sizes", default=GPU_SIZES if cuda else CPU_SIZES, help="SxDxH,...")
    ap.add_argument("--k", default="16,64" if cuda else "32", help="tangent counts, comma-separated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    info = machine_info()
    rows, qr_rows = [], []
    for size in args.sizes.split(","):
        S, D, H = (int(v) for v in size.split("x"))
        for k in (int(v) for v in args.k.split(",")):
            row = bench_size(S, D, H, k, args.steps, dtype, device)
            rows.append(row)
            sp = row.get("speedup")
            print(
                f"S={S:5d} D={D:4d} H={H} k={k:3d}: fastjac {1 / row['fastjac_step_s']:8.2f} steps/s, "
                f"baseline {row.get('baseline_steps_per_s', float('nan')):8.2f} steps/s, "
                + (f"x{sp:.1f}" if sp else f"NO SPEEDUP REPORTED (results differ: {row.get('baseline')})")
                + f" | max |diff| of exponents {row.get('max_abs_diff_exponents', float('nan')):.1e}",
                flush=True,
            )
    if cuda:
        for size in args.sizes.split(","):
            S, D, _ = (int(v) for v in size.split("x"))
            for k in (int(v) for v in args.k.split(",")):
                r = bench_qr(S * D, k, dtype)
                qr_rows.append(r)
                print(
                    f"QR n={r['n']:8d} k={k:3d}: fastjac {r['fastjac_qr_s'] * 1e6:8.1f} us "
                    f"({r['fastjac_GBps']:.0f} GB/s), torch.linalg.qr {r['torch_linalg_qr_s'] * 1e6:8.1f} us: "
                    f"x{r['speedup']:.1f}",
                    flush=True,
                )
    dev = info["device"].replace(" ", "_")
    out = args.out or os.path.join(HERE, "results", f"lyapunov_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            dict(
                benchmark="lyapunov",
                baseline="vmap(jvp) + torch.linalg.qr every step (bench/baselines.py)",
                machine=info,
                rows=rows,
                qr=qr_rows,
            ),
            f,
            indent=1,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
