"""CPU benchmark: fastjac's analytic ("torch" backend) dense step Jacobian and k-tangent JVP against torch.func.

    python bench/bench_cpu_jacobian.py                 # all sizes, writes bench/results/cpu_jacobian.json
    python bench/bench_cpu_jacobian.py --sizes 16x64x4 --k 32

Baselines (bench/baselines.py): the dense Jacobian by ``torch.func.jacrev``; the k-tangent JVP by
``torch.func.vmap(torch.func.jvp)``; both on the same ItrSA model (l2 norm, out projection, float32).
Each measurement runs in a fresh subprocess so that its peak memory (peak resident size VmHWM, reset just before
the first call, minus the resident size then) is its own. Times are medians over at least --repeats calls (more for fast calls, up to
1 s of them). A size's speedups are reported only
if fastjac's result matches the baseline's (relative max error < 1e-4 in float32) in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets the peak resident size (VmHWM) to the current one (Linux >= 4.0); ru_maxrss cannot be reset and
    # is inherited from the parent at fork, so it is not used
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _setup(S, D, H, k, seed=0):
    import torch

    import fastjac as fj

    torch.manual_seed(seed)
    model = fj.ItrSA(D, H)
    X = torch.randn(S, D) * 3
    C = torch.randn(S, D)
    T = torch.randn(k, S, D)
    return model, X, C, T


def child(method, S, D, H, k, repeats, chunk):
    """One measurement in this process: prints JSON {time_s, peak_mb}."""
    import torch
    from baselines import jacrev_dense, vmap_jvp

    import fastjac as fj

    model, X, C, T = _setup(S, D, H, k)
    fn = {
        "dense_fastjac": lambda: fj.jacobian(model, X, C=C, backend="torch"),
        "dense_jacrev": lambda: jacrev_dense(model, X, C, chunk_size=chunk),
        "jvp_fastjac": lambda: fj.jvp(model, X, T, C=C, backend="torch")[1],
        "jvp_vmap": lambda: vmap_jvp(model, X, T, C),
    }[method]
    with torch.no_grad() if method.endswith("fastjac") else torch.enable_grad():
        _reset_peak()
        rss0 = _status_kb("VmRSS")
        out = fn()  # warm-up; its peak is the peak of one call
        peak = _status_kb("VmHWM") - rss0
        del out
        times = []
        while len(times) < repeats or (sum(times) < 1.0 and len(times) < 50):  # fast calls: time >= 1 s of them
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
    print(json.dumps({"time_s": statistics.median(times), "peak_mb": peak / 1024}))


def check(S, D, H, k, chunk):
    """fastjac vs the baselines at this size, in float32: max error relative to the largest entry."""
    import torch
    from baselines import jacrev_dense, vmap_jvp

    import fastjac as fj

    model, X, C, T = _setup(S, D, H, k)
    with torch.no_grad():
        J, JT = fj.jacobian(model, X, C=C), fj.jvp(model, X, T, C=C)[1]
    Jr = jacrev_dense(model, X, C, chunk_size=chunk)
    JTr = vmap_jvp(model, X, T, C)
    err = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return err(J, Jr), err(JT, JTr)


def run_child(args, method, S, D, H, k, chunk):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        method,
        str(S),
        str(D),
        str(H),
        str(k),
        "--repeats",
        str(args.repeats),
    ] + (["--chunk", str(chunk)] if chunk else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16x64x4,33x64x4,64x64x4,81x64x4,128x64x4", help="SxDxH,...")
    ap.add_argument("--k", type=int, default=32, help="tangents for the JVP comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_jacobian.json"))
    ap.add_argument("--child", nargs=5, metavar=("METHOD", "S", "D", "H", "K"), help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, S, D, H, k = args.child
        return child(m, int(S), int(D), int(H), int(k), args.repeats, args.chunk)

    from machine import machine_info

    rows = []
    for spec in args.sizes.split(","):
        S, D, H = map(int, spec.lower().split("x"))
        n = S * D
        # jacrev's vmapped attention VJP keeps several [S*D, H, S, S] tensors: chunk it when that passes ~6 GB
        chunk = 1024 if n * H * S * S * 4 * 4 > 6e9 else None
        e_dense, e_jvp = check(S, D, H, args.k, chunk)
        row = {
            "S": S,
            "D": D,
            "H": H,
            "S*D": n,
            "k": args.k,
            "dtype": "float32",
            "jacrev_chunk_size": chunk,
            "max_rel_err_dense": e_dense,
            "max_rel_err_jvp": e_jvp,
        }
        ok = e_dense < 1e-4 and e_jvp < 1e-4
        for meth in ("dense_fastjac", "dense_jacrev", "jvp_fastjac", "jvp_vmap"):
            row[meth] = run_child(args, meth, S, D, H, args.k, chunk if meth == "dense_jacrev" else None)
        if ok and all("error" not in row[m] for m in ("dense_fastjac", "dense_jacrev", "jvp_fastjac", "jvp_vmap")):
            row["dense_speedup_vs_jacrev"] = row["dense_jacrev"]["time_s"] / row["dense_fastjac"]["time_s"]
            row["dense_peak_mem_ratio"] = row["dense_fastjac"]["peak_mb"] / max(row["dense_jacrev"]["peak_mb"], 1e-3)
            row["jvp_speedup_vs_vmap_jvp"] = row["jvp_vmap"]["time_s"] / row["jvp_fastjac"]["time_s"]
            row["jvp_peak_mem_ratio"] = row["jvp_fastjac"]["peak_mb"] / max(row["jvp_vmap"]["peak_mb"], 1e-3)
        else:
            row["refused"] = "correctness check failed or a measurement errored: no speedup reported"
        rows.append(row)
        print(
            f"S={S:4d} D={D:4d} H={H} S*D={n:5d} | dense: fastjac {row['dense_fastjac'].get('time_s', 'err')} s, "
            f"jacrev {row['dense_jacrev'].get('time_s', 'err')} s, x{row.get('dense_speedup_vs_jacrev', 'n/a')} "
            f"(peak mem ratio {row.get('dense_peak_mem_ratio', 'n/a')}) | k={args.k} JVP: "
            f"x{row.get('jvp_speedup_vs_vmap_jvp', 'n/a')} vs vmap(jvp) | err {e_dense:.1e}/{e_jvp:.1e}",
            flush=True,
        )
    res = {
        "benchmark": "cpu_jacobian",
        "baselines": {"dense": "torch.func.jacrev", "jvp": "torch.func.vmap(jvp)"},
        "machine": machine_info(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
