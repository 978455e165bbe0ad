"""Benchmark: Lyapunov steps/s and peak memory of a looped nn.TransformerEncoderLayer, fastjac vs torch.func (math SDPA).

    python bench/bench_own_model.py                                  # S in {256, 1024, 4096}, k in {16, 32}
    python bench/bench_own_model.py --sizes 256 --k 16 --steps 3      # a quick look

The step is ``lambda x: layer(x)`` with ``layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=256,
dropout=0.0, batch_first=True).eval()`` (D = 64, H = 4, head dim 16; the feed-forward width is 4 D, set by
``--ff``), float32, X [S, 64].

- fastjac: ``fj.lyapunov_spectrum(step, X, k=k, steps=n)``: backend "autograd", whose forward_ad() routes SDPA to
  fastjac.nn.functional (k tangents share one softmax, in one kernel call; the kernel used is printed: the C++
  flash kernel where it is built, else the torch reference chunked over query rows).
- baseline (bench/baselines.py ``lyapunov_autograd``, the same Benettin iteration as users write it):
  ``torch.func.vmap(torch.func.jvp)`` + ``torch.linalg.qr`` every step, with PyTorch's math SDPA backend forced
  (``sdpa_kernel(SDPBackend.MATH)``) and the fused MHA fast path off: the only way torch.func runs this layer
  today. A baseline whose estimated peak (3.2 k H S^2 x 4 bytes: calibrated on the issue's 13.8 GB at S = 4096,
  k = 16) exceeds ``--mem-limit-gb`` (default 24 GiB, or 70 % of this machine's available memory if that is
  less) is skipped and reported as skipped.

Each (S, k, method) runs in a fresh subprocess: peak memory is its ``ru_maxrss`` (the high-water mark of the
process's resident memory, which is what decides whether a run fits; it includes the interpreter and torch,
reported separately as ``rss_setup_mb``, the resident size after building the layer and X, before the run).
Timing: one warm-up step, then ``--steps`` steps timed as one call. For fastjac the time of the attention JVP
kernel calls (inside the step's JVP) is measured separately: "attention JVP" vs "rest" (the layer's other ops
under vmap(jvp), the forward, the QR). Exponents of both methods are compared (same initial tangents); a speedup is
printed only where they agree (max difference below 1e-3, float32). Results: bench/results/own_model_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

D, H = 64, 4


def _layer(ff: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(D, H, dim_feedforward=ff, dropout=0.0, batch_first=True).eval()


def worker(S: int, k: int, method: str, steps: int, ff: int) -> dict:
    import torch
    from baselines import lyapunov_autograd

    import fastjac as fj
    import fastjac.nn.functional as nnf

    layer = _layer(ff)
    X = torch.randn(S, D, generator=torch.Generator().manual_seed(1))
    step = lambda x: layer(x)  # noqa: E731
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"S": S, "k": k, "method": method, "steps": steps, "rss_setup_mb": rss_setup}
    if method == "fastjac":
        att = {"t": 0.0, "calls": 0}
        real = nnf._jvp_k

        def timed(*a):
            t0 = time.perf_counter()
            r = real(*a)
            att["t"] += time.perf_counter() - t0
            att["calls"] += 1
            return r

        nnf._jvp_k = timed
        out["kernel"] = nnf.kernel_for(X)
        with torch.no_grad():
            fj.lyapunov_spectrum(step, X, k=k, steps=1, progress=False)  # warm-up
            att["t"], att["calls"] = 0.0, 0
            t0 = time.perf_counter()
            ex = fj.lyapunov_spectrum(step, X, k=k, steps=steps, progress=False).exponents
            wall = time.perf_counter() - t0
        out.update(attention_jvp_s_per_step=att["t"] / steps, attention_jvp_calls_per_step=att["calls"] / steps)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch.backends.mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH):
            lyapunov_autograd(layer, X, None, k, 1)  # warm-up
            t0 = time.perf_counter()
            ex = lyapunov_autograd(layer, X, None, k, steps)
            wall = time.perf_counter() - t0
        out["kernel"] = "torch math SDPA (vmap materialises k x H x S x S)"
    out.update(
        s_per_step=wall / steps,
        steps_per_s=steps / wall,
        exponents=[float(e) for e in ex],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return out


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--k", default="16,32")
    ap.add_argument("--steps", type=int, default=3, help="timed Lyapunov steps per configuration (after 1 warm-up)")
    ap.add_argument("--ff", type=int, default=4 * D, help="dim_feedforward of the layer")
    ap.add_argument("--mem-limit-gb", type=float, default=None)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "own_model_cpu.json"))
    ap.add_argument("--worker", nargs=3, metavar=("S", "K", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(int(a.worker[0]), int(a.worker[1]), a.worker[2], a.steps, a.ff)))
        return 0

    import torch
    from machine import machine_info

    avail = _mem_available_gb()
    limit = a.mem_limit_gb if a.mem_limit_gb is not None else min(24.0 * 1.073741824, 0.7 * avail)
    info = machine_info()
    info["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    info["mem_available_gb"] = round(avail, 1)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    print(
        f"looped nn.TransformerEncoderLayer(D={D}, H={H}, ff={a.ff}) float32, Lyapunov steps: fastjac vs "
        f"torch.func + math SDPA; {torch.get_num_threads()} threads, load {' '.join(info['loadavg_start'])}, "
        f"baseline memory limit {limit:.1f} GB"
    )
    for S in [int(s) for s in a.sizes.split(",")]:
        for k in [int(x) for x in a.k.split(",")]:
            res = {}
            for method in ("fastjac", "math"):
                est = 3.2 * k * H * S * S * 4 / 1e9
                if method == "math" and est > limit:
                    res[method] = {"skipped": f"estimated peak {est:.1f} GB > limit {limit:.1f} GB"}
                    continue
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    str(S),
                    str(k),
                    method,
                    "--steps",
                    str(a.steps),
                    "--ff",
                    str(a.ff),
                ]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
                    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    res[method] = json.loads(line[7:]) if line else {"failed": (p.stderr or p.stdout)[-600:]}
                except subprocess.TimeoutExpired:
                    res[method] = {"skipped": f"ran past --timeout {a.timeout} s"}
            f, m = res["fastjac"], res["math"]
            row = {"S": S, "k": k, "fastjac": f, "math": m}
            if "s_per_step" in f:
                rest = f["s_per_step"] - f["attention_jvp_s_per_step"]
                msg = (
                    f"S={S:5d} k={k:3d}  fastjac [{f['kernel']}] {f['steps_per_s']:.3f} steps/s, peak "
                    f"{f['peak_rss_mb']:.0f} MB (setup {f['rss_setup_mb']:.0f}); time/step {f['s_per_step']:.3f} s "
                    f"= attention JVP {f['attention_jvp_s_per_step']:.3f} s ({f['attention_jvp_calls_per_step']:.0f} "
                    f"call/step) + rest {rest:.3f} s"
                )
                if "s_per_step" in m:
                    diff = max(abs(x - y) for x, y in zip(f["exponents"], m["exponents"]))
                    row["max_exponent_diff"] = diff
                    if diff < 1e-3:
                        row["speedup"] = m["s_per_step"] / f["s_per_step"]
                        row["memory_ratio"] = m["peak_rss_mb"] / f["peak_rss_mb"]
                        msg += (
                            f"\n             math {m['steps_per_s']:.3f} steps/s, peak {m['peak_rss_mb']:.0f} MB"
                            f"  ->  {row['speedup']:.2f}x faster, {row['memory_ratio']:.1f}x less peak memory "
                            f"(exponents agree to {diff:.1e})"
                        )
                    else:
                        msg += f"\n             math: exponents differ by {diff:.1e}: no speedup reported"
                else:
                    msg += f"\n             math: {m.get('skipped') or 'FAILED ' + m.get('failed', '')}"
            else:
                msg = f"S={S} k={k}: fastjac {f}"
            print(msg, flush=True)
            rows.append(row)
    info["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    doc = {
        "benchmark": "bench_own_model",
        "layer": f"nn.TransformerEncoderLayer({D}, {H}, dim_feedforward={a.ff}, dropout=0.0, batch_first=True).eval()",
        "dtype": "float32",
        "steps": a.steps,
        "baseline": "bench/baselines.py lyapunov_autograd under sdpa_kernel(SDPBackend.MATH), MHA fast path off",
        "memory": "ru_maxrss of a fresh subprocess per configuration",
        "mem_limit_gb": limit,
        "machine": info,
        "results": rows,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(doc, fh, indent=1, allow_nan=False)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
