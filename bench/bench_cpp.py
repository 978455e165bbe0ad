"""backend="cpp" (the compiled C++ CPU kernels) against backend="torch" and vmap(jvp), in one run.

    python bench/bench_cpp.py [--quick] [--out bench/results/cpp_cpu.json]

Measures, on this machine and in this process: the machine's GEMM GFLOP/s (torch.mm, float32/float64); the
Lyapunov step (lyapunov_spectrum steps/s, QR included) at S = 81 and 256, D = 64, H = 4, k = 32, float32 and
float64, against backend="torch" and the hand-rolled vmap(jvp) + torch.linalg.qr baseline (bench/baselines.py);
the dense step Jacobian at S*D = 4096 and 8192; the k-tangent JVP alone (a linearisation's jvp_fn). Results are
compared before any ratio is reported (a mismatch is printed and the speedup is withheld). Also records the load
average, since the 2-core machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import lyapunov_autograd, vmap_jvp  # noqa: E402
from machine import machine_info  # noqa: E402

import fastjac as fj  # noqa: E402
from fastjac.backends import cpp as cppb  # noqa: E402


def timeit(f, min_time=1.0, min_runs=3):
    f()
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_time:
        f()
        runs += 1
    return (time.perf_counter() - t0) / runs


def gemm_gflops(dtype, n=1024):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b) / 1e9


def jvp_flops(S, D, H, k, dh, dv):
    # the reference algorithm's count (ref.msa_jvp): projections, two S^2 dh logit products, two S^2 dv products,
    # output projection; the norm's O(k S D) is ignored
    return 2 * k * S * D * H * (2 * dh + dv) + 2 * k * H * S * S * (2 * dh + 2 * dv) + 2 * k * S * H * dv * D


def model(S, D, H, dtype, seed=0):
    torch.manual_seed(seed)
    m = fj.ItrSA(D, H, norm="l2", dtype=dtype).requires_grad_(False)
    X = torch.randn(S, D, dtype=dtype)
    C = torch.randn(S, D, dtype=dtype)
    return m, X, C


def bench_lyapunov(S, D, H, k, dtype, steps, base_steps):
    m, X, C = model(S, D, H, dtype)
    kw = dict(C=C, k=k, steps=steps, progress=False, qr_backend="torch")
    out = {"S": S, "D": D, "H": H, "k": k, "dtype": str(dtype).replace("torch.", ""), "steps": steps}
    res = {}
    for be in ("torch", "cpp"):
        fj.lyapunov_spectrum(m, X, **dict(kw, steps=1), backend=be)  # warm-up
        t0 = time.perf_counter()
        res[be] = fj.lyapunov_spectrum(m, X, backend=be, **kw).exponents
        out[f"{be}_steps_per_s"] = steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    lyapunov_autograd(m, X, C, k, base_steps)
    out["vmap_jvp_steps_per_s"] = base_steps / (time.perf_counter() - t0)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    out["max_abs_diff_exponents"] = (res["cpp"] - res["torch"]).abs().max().item()
    out["results_match"] = out["max_abs_diff_exponents"] < tol
    if out["results_match"]:
        out["speedup_vs_torch"] = out["cpp_steps_per_s"] / out["torch_steps_per_s"]
        out["speedup_vs_vmap_jvp"] = out["cpp_steps_per_s"] / out["vmap_jvp_steps_per_s"]
    flop = jvp_flops(S, D, H, k, D // H, D // H)
    out["cpp_jvp_gflops_in_step"] = flop * out["cpp_steps_per_s"] / 1e9
    return out


def bench_jvp(S, D, H, k, dtype):
    m, X, C = model(S, D, H, dtype)
    T = torch.randn(k, S, D, dtype=dtype)
    out = {"S": S, "D": D, "H": H, "k": k, "dtype": str(dtype).replace("torch.", "")}
    ys = {}
    for be in ("torch", "cpp"):
        _, f = fj.linearize(m, X, C=C, backend=be)
        ys[be] = f(T)
        out[f"{be}_jvp_s"] = timeit(lambda: f(T))
    out["vmap_jvp_s"] = timeit(lambda: vmap_jvp(m, X, T, C))
    ref = vmap_jvp(m, X, T, C)
    out["max_rel_err_vs_vmap"] = ((ys["cpp"] - ref).abs().max() / ref.abs().max()).item()
    out["results_match"] = out["max_rel_err_vs_vmap"] < (1e-10 if dtype == torch.float64 else 3e-5)
    flop = jvp_flops(S, D, H, k, D // H, D // H)
    for key in ("torch", "cpp", "vmap"):
        out[f"{key}_gflops"] = flop / out[f"{key}_jvp_s"] / 1e9
    if out["results_match"]:
        out["speedup_vs_torch"] = out["torch_jvp_s"] / out["cpp_jvp_s"]
        out["speedup_vs_vmap_jvp"] = out["vmap_jvp_s"] / out["cpp_jvp_s"]
    return out


def bench_dense(S, D, H, dtype):
    m, X, C = model(S, D, H, dtype)
    out = {"S": S, "D": D, "H": H, "S*D": S * D, "dtype": str(dtype).replace("torch.", "")}
    buf = torch.empty(S * D, S * D, dtype=dtype)
    J = {}
    for be in ("torch", "cpp"):
        J[be] = fj.jacobian(m, X, C=C, backend=be).clone()
        lin = fj.backends.get(be).linearize(m, X[None], C[None], True)
        out[f"{be}_dense_s"] = timeit(
            lambda: fj.backends.get(be).linearize(m, X[None], C[None], True).dense(out=buf.view(1, S * D, S * D))
        )
        del lin
    out["write_output_s"] = timeit(lambda: buf.fill_(1.0))
    out["max_rel_diff_vs_torch"] = ((J["cpp"] - J["torch"]).abs().max() / J["torch"].abs().max()).item()
    out["results_match"] = out["max_rel_diff_vs_torch"] < (1e-10 if dtype == torch.float64 else 3e-5)
    gb = (S * D) ** 2 * buf.element_size() / 1e9
    out["output_gb"] = gb
    out["cpp_write_gb_per_s"] = gb / out["cpp_dense_s"]
    out["fill_gb_per_s"] = gb / out["write_output_s"]
    out["cpp_writer_gflops"] = 2 * 2 * H * (S * D) ** 2 / out["cpp_dense_s"] / 1e9
    if out["results_match"]:
        out["speedup_vs_torch"] = out["torch_dense_s"] / out["cpp_dense_s"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (a smoke run)")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpp_cpu.json")
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cppb.load()
    print(f"extension loaded in {time.perf_counter() - t0:.1f} s (build record: {cppb.build_info()})")
    load_before = os.getloadavg()
    gemm = {str(dt).replace("torch.", ""): gemm_gflops(dt) for dt in (torch.float32, torch.float64)}
    print(
        f"GEMM (torch.mm 1024^3, {torch.get_num_threads()} threads): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm.items())
    )
    Ss = (81,) if args.quick else (81, 256)
    rows = {"lyapunov": [], "jvp": [], "dense": []}
    with torch.no_grad():
        for S in Ss:
            for dt in (torch.float32, torch.float64):
                steps = (20 if S <= 81 else 6) if not args.quick else 3
                r = bench_lyapunov(S, 64, 4, 32, dt, steps, max(2, steps // 2))
                rows["lyapunov"].append(r)
                print(
                    f"lyapunov S={S} {r['dtype']}: cpp {r['cpp_steps_per_s']:.1f} steps/s, torch "
                    f"{r['torch_steps_per_s']:.1f}, vmap(jvp) {r['vmap_jvp_steps_per_s']:.1f}; "
                    + (
                        f"{r['speedup_vs_torch']:.2f}x torch, {r['speedup_vs_vmap_jvp']:.2f}x vmap(jvp)"
                        if r["results_match"]
                        else f"RESULTS DIFFER ({r['max_abs_diff_exponents']:.2e})"
                    )
                )
                r = bench_jvp(S, 64, 4, 32, dt)
                rows["jvp"].append(r)
                print(
                    f"  k-tangent JVP: cpp {r['cpp_jvp_s'] * 1e3:.2f} ms ({r['cpp_gflops']:.1f} GFLOP/s), torch "
                    f"{r['torch_jvp_s'] * 1e3:.2f} ms ({r['torch_gflops']:.1f}), vmap(jvp) "
                    f"{r['vmap_jvp_s'] * 1e3:.2f} ms; "
                    + (
                        f"{r['speedup_vs_torch']:.2f}x torch, {r['speedup_vs_vmap_jvp']:.2f}x vmap(jvp)"
                        if r["results_match"]
                        else f"RESULTS DIFFER ({r['max_rel_err_vs_vmap']:.2e})"
                    )
                )
        for S in (16,) if args.quick else (64, 128):
            for dt in (torch.float32, torch.float64):
                r = bench_dense(S, 64, 4, dt)
                rows["dense"].append(r)
                print(
                    f"dense S*D={S * 64} {r['dtype']}: cpp {r['cpp_dense_s'] * 1e3:.1f} ms "
                    f"({r['cpp_write_gb_per_s']:.2f} GB/s, fill {r['fill_gb_per_s']:.2f} GB/s), torch "
                    f"{r['torch_dense_s'] * 1e3:.1f} ms; "
                    + (
                        f"{r['speedup_vs_torch']:.2f}x torch"
                        if r["results_match"]
                        else f"RESULTS DIFFER ({r['max_rel_diff_vs_torch']:.2e})"
                    )
                )
    result = {
        "benchmark": "cpp",
        "baselines": "backend='torch'; vmap(jvp) (+ torch.linalg.qr) from bench/baselines.py",
        "machine": machine_info(),
        "gemm_gflops": gemm,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "build": cppb.build_info(),
        "rows": rows,
    }
    print(f"load average before {load_before}, after {result['loadavg_after']}")
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
