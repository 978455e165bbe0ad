"""Roofline of backend="cpp" on this CPU: achieved GFLOP/s beside the measured GEMM peak, peak memory, and the dense
writer's GB/s beside fill_ of the same output; backend="torch" and vmap(jvp) in the same run where they fit.

    python bench/bench_roofline.py [--sizes 81,256,1024,4096,16384] [--ks 16,32] [--dtypes float32,float64]
                                   [--threads N] [--out bench/results/roofline_cpu.json]

Every configuration runs in its own subprocess, so its peak memory is its own (``ru_maxrss`` minus the resident
size just before the measured work, after imports and a tiny warm-up). Measured:

* GEMM peak: ``torch.mm`` 2048^3 (float32, float64), at the start and the end of the run (the machine is shared).
* k-tangent JVP (a linearisation's ``jvp_fn``, D = 64, H = 4, l2 norm): seconds and GFLOP/s with the reference
  algorithm's FLOP count (``bench_cpp.jvp_flops``: projections, the two S^2 dh logit products and two S^2 dv
  products per tangent, output projection), as a share of the GEMM peak of its dtype.
* Lyapunov step (``fj.lyapunov_spectrum``, QR included): seconds per step, GFLOP/s, peak memory beside
  state + tangents + weights.
* Dense step Jacobian at S*D = 4096, 8192: the fused writer (``step_dense_flash_``), the former factored writer,
  backend="torch", and ``fill_`` of the same output.

A baseline whose estimated memory exceeds ``--baseline-gb`` (default 3 GB: the machine is shared) is skipped and
the row says so. Results are checked against backend="torch" (or vmap(jvp)) wherever one ran; speedups are only
printed for matching results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timeit(f, min_time=1.0, min_runs=2, max_runs=50):
    f()
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or (time.perf_counter() - t0 < min_time and runs < max_runs):
        f()
        runs += 1
    return (time.perf_counter() - t0) / runs


def gemm_gflops(dtype, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, min_time=1.0) / 1e9


def _dt(name):
    return getattr(torch, name)


def _model(S, D, H, dtype, seed=0):
    import fastjac as fj

    torch.manual_seed(seed)
    m = fj.ItrSA(D, H, norm="l2", dtype=dtype).requires_grad_(False)
    return m, torch.randn(S, D, dtype=dtype), torch.randn(S, D, dtype=dtype)


def _attn_bytes(S, H, k, elem, copies=4):
    # backend="torch" / vmap(jvp) hold k x H x S x S tensors (logit tangents, products): about `copies` of them
    return copies * k * H * S * S * elem


# ------------------------------------------------------------------------------------------------ workers


def work_jvp(S, k, dtype, D, H, baseline_gb):
    from baselines import vmap_jvp
    from bench_cpp import jvp_flops

    import fastjac as fj

    dt = _dt(dtype)
    m, X, C = _model(S, D, H, dt)
    T = torch.randn(k, S, D, dtype=dt)
    flop = jvp_flops(S, D, H, k, D // H, D // H)
    out = dict(S=S, k=k, dtype=dtype, D=D, H=H, gflop=flop / 1e9)
    fits = _attn_bytes(S, H, k, X.element_size()) < baseline_gb * 1e9
    ys = {}
    with torch.no_grad():
        w = max(16, min(256, S // 4))  # warm-up size, as in work_lyap
        out["warmup_S"] = w
        fj.jvp(m, X[:w], T[:, :w], C=C[:w], backend="cpp")
        rss0 = _rss_mb()
        for be in ("cpp", "torch", "vmap_jvp"):
            if be != "cpp" and not fits:
                out[f"{be}_skipped"] = (
                    f"needs ~{_attn_bytes(S, H, k, X.element_size()) / 1e9:.1f} GB of "
                    f"[k, H, S, S] temporaries (> {baseline_gb} GB)"
                )
                continue
            if be == "vmap_jvp":
                f = lambda: vmap_jvp(m, X, T, C)  # noqa: E731
            else:
                _, jf = fj.linearize(m, X, C=C, backend=be)
                f = lambda jf=jf: jf(T)  # noqa: E731
            t0 = time.perf_counter()
            ys[be] = f()
            t = time.perf_counter() - t0
            if S <= 4096:  # large S: the first call (seconds to minutes) is the measurement
                t = timeit(f, min_time=1.0 if S <= 1024 else 0.0, min_runs=2 if S <= 1024 else 1)
            out[f"{be}_s"] = t
            out[f"{be}_gflops"] = flop / t / 1e9
        out["peak_mb_above_start"] = _maxrss_mb() - rss0
    ref = ys.get("torch", ys.get("vmap_jvp"))
    if ref is not None:
        err = ((ys["cpp"] - ref).abs().max() / ref.abs().max()).item()
        out["max_rel_err_vs_baseline"] = err
        out["results_match"] = err < (1e-10 if dt == torch.float64 else 3e-5)
    return out


def work_lyap(S, k, dtype, D, H, steps, baseline_gb):
    from bench_cpp import jvp_flops

    import fastjac as fj

    dt = _dt(dtype)
    m, X, C = _model(S, D, H, dt)
    elem = X.element_size()
    out = dict(S=S, k=k, dtype=dtype, D=D, H=H, steps=steps)
    kw = dict(C=C, k=k, progress=False, qr_backend="torch")
    # warm-up at a quarter of the size (<= 256): allocator pools, MKL's buffers and thread state are then in the
    # resident size before rss0, so the peak above it is this run's own memory
    w = max(16, min(256, S // 4))
    out["warmup_S"] = w
    fj.lyapunov_spectrum(m, X[:w], **dict(kw, C=C[:w], steps=1), backend="cpp")
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    r = fj.lyapunov_spectrum(m, X, steps=steps, backend="cpp", **kw)
    out["cpp_step_s"] = (time.perf_counter() - t0) / steps
    out["peak_mb_above_start"] = _maxrss_mb() - rss0
    weights = sum(p.numel() for p in m.parameters()) * elem
    out["state_tangents_weights_mb"] = ((k + 1) * S * D * elem + weights) / 2**20
    out["peak_over_state"] = out["peak_mb_above_start"] / out["state_tangents_weights_mb"]
    # one step = forward + k-tangent JVP + QR of [S D, k]; the FLOPs counted: the JVP's reference count + QR's
    out["gflop_per_step"] = (jvp_flops(S, D, H, k, D // H, D // H) + 2 * S * D * k * k) / 1e9
    out["cpp_gflops"] = out["gflop_per_step"] / out["cpp_step_s"]
    if _attn_bytes(S, H, k, elem) < baseline_gb * 1e9:
        t0 = time.perf_counter()
        r2 = fj.lyapunov_spectrum(m, X, steps=steps, backend="torch", **kw)
        out["torch_step_s"] = (time.perf_counter() - t0) / steps
        out["max_abs_diff_exponents"] = (r.exponents - r2.exponents).abs().max().item()
        out["results_match"] = out["max_abs_diff_exponents"] < (1e-8 if dt == torch.float64 else 1e-3)
    else:
        out["torch_skipped"] = f"needs ~{_attn_bytes(S, H, k, elem) / 1e9:.1f} GB (> {baseline_gb} GB)"
    return out


def work_dense(S, dtype, D, H):
    import fastjac as fj
    from fastjac.ops.step.cpp import step_dense_factored

    dt = _dt(dtype)
    m, X, C = _model(S, D, H, dt)
    out = dict(S=S, D=D, H=H, dtype=dtype, SD=S * D)
    buf = torch.empty(1, S * D, S * D, dtype=dt)
    J = {}
    with torch.no_grad():
        for be in ("cpp", "cpp_factored", "torch"):
            lin = fj.backends.get("torch" if be == "torch" else "cpp").linearize(m, X[None], C[None], True)
            f = (
                (lambda lin=lin: step_dense_factored(lin, buf))
                if be == "cpp_factored"
                else (lambda lin=lin: lin.dense(out=buf))
            )
            J[be] = f().clone()
            # the linearisation (forward) is shared by all dense calls; time the writer as a user calls dense()
            out[f"{be}_s"] = timeit(f)
            del lin
        out["fill_s"] = timeit(lambda: buf.fill_(1.0))
    gb = buf.numel() * buf.element_size() / 1e9
    out["output_gb"] = gb
    for be in ("cpp", "cpp_factored", "torch"):
        out[f"{be}_gb_per_s"] = gb / out[f"{be}_s"]
    out["fill_gb_per_s"] = gb / out["fill_s"]
    err = ((J["cpp"] - J["torch"]).abs().max() / J["torch"].abs().max()).item()
    out["max_rel_diff_vs_torch"] = err
    out["results_match"] = err < (1e-10 if dt == torch.float64 else 3e-5)
    out["cpp_over_fill"] = out["cpp_s"] / out["fill_s"]
    if out["results_match"]:
        out["speedup_vs_torch"] = out["torch_s"] / out["cpp_s"]
        out["speedup_vs_factored"] = out["cpp_factored_s"] / out["cpp_s"]
    return out


def _worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from fastjac.backends import cpp as cppb

    cppb.load(build=False)
    kind = spec.pop("kind")
    spec.pop("threads", None)
    fn = dict(jvp=work_jvp, lyap=work_lyap, dense=work_dense)[kind]
    r = fn(**spec)
    r["kind"] = kind
    r["loadavg"] = os.getloadavg()
    return r


def _run(spec: dict, timeout: float) -> dict:
    try:
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    if p.returncode != 0:
        return dict(spec, error=p.stderr.strip()[-1500:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="81,256,1024,4096,16384")
    ap.add_argument("--ks", default="16,32")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--dense", default="64,128", help="dense Jacobian token counts S (D = 64); '' for none")
    ap.add_argument("--what", default="jvp,lyap,dense")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline-gb", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "roofline_cpu.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_worker(json.loads(args.one))))
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    from machine import machine_info

    from fastjac.backends import cpp as cppb

    cppb.load()
    what = args.what.split(",")
    load_before = os.getloadavg()
    peak = {d: gemm_gflops(_dt(d)) for d in ("float32", "float64")}
    print(
        f"GEMM peak (torch.mm 2048^3, {torch.get_num_threads()} threads): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items())
        + f"; load {load_before}",
        flush=True,
    )
    rows = []
    base = dict(threads=args.threads)
    for dtype in args.dtypes.split(","):
        for S in map(int, args.sizes.split(",")):
            for k in map(int, args.ks.split(",")):
                if "jvp" in what:
                    r = _run(
                        dict(base, kind="jvp", S=S, k=k, dtype=dtype, D=64, H=4, baseline_gb=args.baseline_gb),
                        args.timeout,
                    )
                    if "cpp_gflops" in r:
                        r["cpp_share_of_peak"] = r["cpp_gflops"] / peak[dtype]
                    rows.append(r)
                    print("jvp  ", _fmt(r), flush=True)
                if "lyap" in what:
                    steps = 3 if S <= 1024 else 1
                    r = _run(
                        dict(
                            base,
                            kind="lyap",
                            S=S,
                            k=k,
                            dtype=dtype,
                            D=64,
                            H=4,
                            steps=steps,
                            baseline_gb=args.baseline_gb,
                        ),
                        args.timeout,
                    )
                    if "cpp_gflops" in r:
                        r["cpp_share_of_peak"] = r["cpp_gflops"] / peak[dtype]
                    rows.append(r)
                    print("lyap ", _fmt(r), flush=True)
        if "dense" in what and args.dense:
            for S in map(int, args.dense.split(",")):
                r = _run(dict(base, kind="dense", S=S, dtype=dtype, D=64, H=4), args.timeout)
                rows.append(r)
                print("dense", _fmt(r), flush=True)
    peak_after = {d: gemm_gflops(_dt(d)) for d in ("float32", "float64")}
    result = dict(
        benchmark="roofline",
        machine=machine_info(),
        threads=torch.get_num_threads(),
        gemm_peak_gflops_start=peak,
        gemm_peak_gflops_end=peak_after,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        build=cppb.build_info(),
        rows=rows,
        flop_count="bench_cpp.jvp_flops (reference algorithm); Lyapunov adds 2 S D k^2 for the QR",
    )
    print(f"GEMM peak at the end: {peak_after}; load {result['loadavg_after']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


def _fmt(r):
    keep = {
        k: (float(f"{v:.4g}") if isinstance(v, float) else v)
        for k, v in r.items()
        if k not in ("D", "H", "threads", "baseline_gb")
    }
    return json.dumps(keep)


if __name__ == "__main__":
    main()
