"""GPU benchmark of fastjac's Triton backend (not a test). One command, one run, one JSON file:

    python bench/bench_gpu_triton.py                       # all sizes -> bench/results/gpu_triton_<device>.json
    python bench/bench_gpu_triton.py --quick               # the Sudoku model only
    TRITON_INTERPRET=1 python bench/bench_gpu_triton.py --cpu-smoke   # tiny sizes on the CPU: checks the script

Measured (medians of ``triton.testing.do_bench``; a call over 1 s is timed 3 times by CUDA events instead):

- k-tangent JVP (``fj.linearize(..., backend="triton")`` then ``jvp_fn(T)``) against ``torch.func.vmap(torch.func.jvp)``
  through the model's plain forward (math attention, explicit softmax), and against k separate one-tangent passes of
  the same kernel (what sharing one softmax across the k tangents buys).
- dense step Jacobian (``lin.dense(out)``) against ``torch.func.jacrev`` (chunk_size rows at a time) and against the
  time to write the same output once at this device's bandwidth (``out.fill_``, measured in the same run).
- FLOPs per call of the two-pass attention JVP beside the one-tangent-per-call baseline (printed first, also without
  a GPU: arithmetic only), and the launch-table entries (tiles, num_warps, num_stages) the run used;
- achieved TFLOP/s and GB/s (formulas printed beside them), peak memory per method (``torch.cuda.max_memory_allocated``
  over the call, minus what was allocated before), and the error of ``matmul_precision="tf32"`` against float64.

Correctness gate: a speedup is reported only if fastjac's result matches the baseline's in the same run (relative
max error < 5e-4 in float32, the float32 rounding of sums over up to 4096 keys); where the baseline cannot run (it
would exceed memory) fastjac is checked against the float64 torch backend on the first tangents instead, and the
output says so. Sizes whose dense Jacobian or baseline would exceed the device's free memory are skipped, with the
reason. The model is ItrSA (l2 norm, output projection), float32, batch 1, random weights and inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

MATCH_TOL = 5e-4
SUDOKU = dict(S=81, D=512, H=8)
LARGE = [dict(S=S, D=D, H=8) for S in (1024, 4096) for D in (256, 512)]
KS = (16, 64)


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


class Timer:
    """Medians by triton.testing.do_bench on CUDA; wall-clock medians in --cpu-smoke mode."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def __call__(self, fn) -> float:
        """Median seconds per call."""
        first = self.once(fn)  # also the warm-up (compilation)
        if not self.cuda:
            return statistics.median([first] + [self.once(fn) for _ in range(2)])
        if first > 1.0:
            return statistics.median([self.once(fn) for _ in range(3)])
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def peak_mb(fn, cuda: bool):
    """Peak memory of one call above what was allocated before it, in MB (None off CUDA)."""
    if not cuda:
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def free_bytes(cuda: bool) -> int:
    if cuda:
        return torch.cuda.mem_get_info()[0]
    return 8 * 2**30


def setup(S, D, H, k, device, seed=0):
    import fastjac as fj

    torch.manual_seed(seed)
    model = fj.ItrSA(D, H, device=device)
    X = torch.randn(1, S, D, device=device) * 3
    C = torch.randn(1, S, D, device=device)
    T = torch.randn(k, 1, S, D, device=device)
    return model, X, C, T


def jvp_flops(S, D, H, dh, dv, k, B=1, BV=None):
    """Attention part (the kernels: one forward, then the two-pass tangent kernel, which recomputes q.k^T per tangent
    and per value tile; causal would halve it) + the torch projection GEMMs."""
    from fastjac.ops.attention.triton import attn_flops

    attn = attn_flops(S, dh, dv, k, B=B, H=H, BV=BV)["two_pass"]
    proj = k * B * S * 2 * D * H * (2 * dh + 2 * dv)  # T Wq, T Wk, T Wv and Wo^T od
    return attn + proj


def flop_table(sizes, ks, arch=90) -> list:
    """FLOPs per k-tangent JVP call of the attention kernels (two-pass design, value tile BV from the launch table of
    ``arch``) beside the one-tangent-per-call baseline (a JVP-flash kernel redoing the forward per tangent) and the
    former shared-softmax 3-D kernel. Arithmetic only: nothing is timed."""
    from fastjac.ops import _launch
    from fastjac.ops._utils import pow2
    from fastjac.ops.attention.triton import attn_flops

    rows = []
    for cfg in sizes:
        S, D, H = cfg["S"], cfg["D"], cfg["H"]
        dh = dv = D // H
        _, ent = _launch.config("attn_jvp", arch, "tf32", pow2(dh))
        for k in ks:
            f = attn_flops(S, dh, dv, k, H=H, BV=ent["BV"])
            rows.append(dict(S=S, D=D, H=H, k=k, BV=ent["BV"], **f))
    return rows


def print_flop_table(rows) -> None:
    print(
        "attention FLOPs per JVP call (B = 1, non-causal; GFLOP): two-pass incl. its forward | two-pass after "
        "linearize (forward cached) | one tangent per call (baseline) | former shared-p 3-D kernel | ratio "
        "two-pass (incl. forward) / baseline"
    )
    for r in rows:
        print(
            f"  S={r['S']:<5d} D={r['D']:<4d} H={r['H']} k={r['k']:<3d} BV={r['BV']:<3d} "
            f"{r['two_pass'] / 1e9:10.2f} | {r['two_pass_cached_forward'] / 1e9:10.2f} | "
            f"{r['one_tangent_per_call'] / 1e9:10.2f} | {r['shared_softmax_3d'] / 1e9:10.2f} | "
            f"{r['ratio_vs_baseline']:.3f}"
        )


def jvp_bytes(S, D, H, dh, dv, k, B=1, es=4):
    """Unique bytes: T in and JT out, q/k/v, and the projected tangents written once and read once by the kernel."""
    return es * (2 * k * B * S * D + 3 * B * H * S * (dh + dv) + 2 * k * B * H * S * (2 * dh + 2 * dv))


def dense_flops(S, D, H, B=1):
    return B * (S * D) ** 2 * 4 * H  # 2H fused multiply-adds per output element (factors: lower order)


def dense_bytes(S, D, B=1, es=4):
    return B * (S * D) ** 2 * es  # every element written once


def bench_jvp(cfg, k, timer, cuda, device, notes):
    from baselines import k_single_tangent_jvps, vmap_jvp

    import fastjac as fj

    S, D, H = cfg["S"], cfg["D"], cfg["H"]
    model, X, C, T = setup(S, D, H, k, device)
    dh = dv = model.head_dim
    row = dict(op="jvp", S=S, D=D, H=H, k=k, dtype="float32")
    _, f = fj.linearize(model, X, C=C, backend="triton")
    ours = f(T)
    es = 4
    # vmap(jvp) through math attention holds ~8 [k, H, S, S] float32 tensors at once
    need = 8 * k * H * S * S * es
    baseline_ok = need < 0.6 * free_bytes(cuda)
    if baseline_ok:
        ref = vmap_jvp(model, X, T, C)
        err = rel(ours, ref)
        row["check"] = dict(against="vmap(jvp) float32", rel_err=err, tol=MATCH_TOL)
        del ref
    else:
        row["baseline_skipped"] = f"vmap(jvp) would need ~{need / 1e9:.0f} GB (> 60% of free memory)"
        notes.append(f"S={S} D={D} k={k}: {row['baseline_skipped']}")
        m64 = copy.deepcopy(model).double()
        ref = fj.jvp(m64, X.double(), T[:2].double(), C=C.double(), backend="torch")[1]
        err = rel(ours[:2], ref)
        row["check"] = dict(against="torch backend float64, first 2 tangents", rel_err=err, tol=MATCH_TOL)
        del ref, m64
    ok = err < MATCH_TOL
    row["match"] = ok

    t_ours = timer(lambda: f(T))
    row["fastjac_s"] = t_ours
    row["fastjac_peak_mb"] = peak_mb(lambda: f(T), cuda)
    from fastjac.ops import _launch
    from fastjac.ops._utils import pow2

    arch = _launch.arch_of(device)
    bv = _launch.config("attn_jvp", arch, "fp32", pow2(dh))[1]["BV"] if arch else None
    fl, by = jvp_flops(S, D, H, dh, dv, k, BV=bv), jvp_bytes(S, D, H, dh, dv, k)
    row["flop_formula"] = (
        "B H S^2 (2(dh+dv) + k 2(3 dh nv + 2 dv)) + 2 k B S D H (2dh + 2dv), nv = cdiv(dv, BV) "
        "(two-pass: q.k^T recomputed per tangent and value tile)"
    )
    if arch:
        row["launch"] = {
            kind: dict(
                arch=arch,
                **dict(_launch.config(kind, arch, "fp32", pow2(dh))[1].tiles),
                **_launch.config(kind, arch, "fp32", pow2(dh))[1].options(),
            )
            for kind in ("attn_fwd", "attn_jvp")
        }
    row["byte_formula"] = "4 (2 k B S D + 3 B H S (dh+dv) + 2 k B H S (2dh + 2dv))"
    row["tflops"], row["gbps"] = fl / t_ours / 1e12, by / t_ours / 1e9
    t_single = timer(lambda: k_single_tangent_jvps(f, T))
    row["k_single_passes_s"] = t_single
    if baseline_ok:
        t_base = timer(lambda: vmap_jvp(model, X, T, C))
        row["vmap_jvp_s"] = t_base
        row["vmap_jvp_peak_mb"] = peak_mb(lambda: vmap_jvp(model, X, T, C), cuda)
    if ok:
        row["speedup_vs_k_single"] = t_single / t_ours
        if baseline_ok:
            row["speedup_vs_vmap_jvp"] = row["vmap_jvp_s"] / t_ours
    else:
        notes.append(f"jvp S={S} D={D} k={k}: fastjac does not match ({err:.2e} >= {MATCH_TOL}); no speedup reported")

    # TF32 operands in the kernels' tl.dot: error against float64 (torch backend) on the first tangents
    m64 = copy.deepcopy(model).double()
    kk = min(k, 4)
    ref64 = fj.jvp(m64, X.double(), T[:kk].double(), C=C.double(), backend="torch")[1]
    with fj.config.settings(matmul_precision="tf32"):
        _, f32 = fj.linearize(model, X, C=C, backend="triton")
        row["tf32_rel_err_vs_f64"] = rel(f32(T[:kk]), ref64)
        row["tf32_s"] = timer(lambda: f32(T))
    row["ieee_rel_err_vs_f64"] = rel(f(T[:kk]), ref64)
    del m64, ref64
    return row


def bench_dense(cfg, timer, cuda, device, notes, chunk_size):
    from baselines import jacrev_dense, write_output

    import fastjac as fj

    S, D, H = cfg["S"], cfg["D"], cfg["H"]
    n = S * D
    out_bytes = n * n * 4
    row = dict(op="dense", S=S, D=D, H=H, dtype="float32", out_gb=out_bytes / 1e9)
    if 2.2 * out_bytes > free_bytes(cuda):
        row["skipped"] = f"dense Jacobian is {out_bytes / 1e9:.0f} GB; fastjac's plus jacrev's exceed free memory"
        notes.append(f"dense S={S} D={D}: {row['skipped']}")
        return row
    model, X, C, _ = setup(S, D, H, 1, device)
    lin = fj.backends.select(model, X, "triton").linearize(model, X, C, True)
    out = torch.full((1, n, n), float("nan"), device=device)
    lin.dense(out=out)
    assert bool(torch.isfinite(out).all()), "dense: unwritten (NaN) elements"
    ref = jacrev_dense(model, X[0], C[0], chunk_size=chunk_size)
    err = rel(out[0], ref)
    del ref
    ok = err < MATCH_TOL
    row.update(check=dict(against="jacrev float32", rel_err=err, tol=MATCH_TOL), match=ok)
    t_ours = timer(lambda: lin.dense(out=out))
    t_write = timer(lambda: write_output(out))
    row["fastjac_s"], row["write_s"] = t_ours, t_write
    row["fastjac_over_write"] = t_ours / t_write
    row["write_gbps"] = out_bytes / t_write / 1e9
    row["gbps"] = dense_bytes(S, D) / t_ours / 1e9
    row["tflops"] = dense_flops(S, D, H) / t_ours / 1e12
    row["byte_formula"] = "4 (S D)^2 (one write per element)"
    row["flop_formula"] = "(S D)^2 4H (rank-2H expansion per element)"
    row["fastjac_peak_mb"] = peak_mb(lambda: lin.dense(out=out), cuda)  # beyond the preallocated output
    out = None  # frees the output (not `del`: the timing lambdas above close over the name)
    t_base = timer(lambda: jacrev_dense(model, X[0], C[0], chunk_size=chunk_size))
    row["jacrev_s"] = t_base
    row["jacrev_peak_mb"] = peak_mb(lambda: jacrev_dense(model, X[0], C[0], chunk_size=chunk_size), cuda)
    row["jacrev_chunk_size"] = chunk_size
    if ok:
        row["speedup_vs_jacrev"] = t_base / t_ours
    else:
        notes.append(f"dense S={S} D={D}: fastjac does not match jacrev ({err:.2e}); no speedup reported")
    return row


def fmt(row) -> str:
    def g(key, spec="{:.3g}"):
        return spec.format(row[key]) if row.get(key) is not None else "-"

    head = f"{row['op']:5s} S={row['S']:<5d} D={row['D']:<4d} H={row['H']}" + (
        f" k={row['k']:<3d}" if "k" in row else ""
    )
    if "skipped" in row:
        return head + "  skipped: " + row["skipped"]
    chk = row["check"]
    s = f"{head}  match={row['match']} (err {chk['rel_err']:.1e} vs {chk['against']})  fastjac {g('fastjac_s')} s"
    if row["op"] == "jvp":
        s += (
            f", vmap(jvp) {g('vmap_jvp_s')} s (x{g('speedup_vs_vmap_jvp')}), k single passes "
            f"{g('k_single_passes_s')} s (x{g('speedup_vs_k_single')}), {g('tflops')} TFLOP/s, {g('gbps')} GB/s, "
            f"peak {g('fastjac_peak_mb', '{:.0f}')} MB vs {g('vmap_jvp_peak_mb', '{:.0f}')} MB; tf32 err "
            f"{g('tf32_rel_err_vs_f64', '{:.1e}')} (ieee {g('ieee_rel_err_vs_f64', '{:.1e}')}), tf32 {g('tf32_s')} s"
        )
    else:
        s += (
            f", write {g('write_s')} s ({g('write_gbps')} GB/s; fastjac/write = {g('fastjac_over_write')}), "
            f"jacrev {g('jacrev_s')} s (x{g('speedup_vs_jacrev')}), {g('gbps')} GB/s, {g('tflops')} TFLOP/s, "
            f"peak {g('fastjac_peak_mb', '{:.0f}')} MB vs jacrev {g('jacrev_peak_mb', '{:.0f}')} MB"
        )
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the Sudoku model (S=81, D=512, H=8) only")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes on the CPU under TRITON_INTERPRET=1, to check this script without a GPU",
    )
    ap.add_argument("--chunk-size", type=int, default=2048, help="jacrev's chunk_size (rows per reverse pass)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_triton_<device>.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
            return 2
        cuda, device = False, "cpu"
        sizes, ks, chunk = [dict(S=9, D=16, H=2)], (2, 4), 64
    elif not cuda:
        print(
            "bench_gpu_triton.py: no CUDA device found; this benchmark needs a GPU (nothing was measured). "
            "For a CPU check of the script: TRITON_INTERPRET=1 python bench/bench_gpu_triton.py --cpu-smoke"
        )
        print_flop_table(flop_table([SUDOKU] + LARGE, (1,) + KS))
        return 0
    else:
        device = "cuda"
        sizes, ks, chunk = ([SUDOKU] if args.quick else [SUDOKU] + LARGE), KS, args.chunk_size
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 baselines in IEEE float32, as fastjac's default
        torch.backends.cudnn.allow_tf32 = False
    from machine import machine_info

    import fastjac as fj

    flops = flop_table([SUDOKU] + LARGE, (1,) + KS)
    print_flop_table(flops)
    timer = Timer(cuda)
    rows, notes = [], []
    for cfg in sizes:
        for k in ks:
            rows.append(bench_jvp(cfg, k, timer, cuda, device, notes))
            print(fmt(rows[-1]), flush=True)
            if cuda:
                torch.cuda.empty_cache()
        if cfg is SUDOKU or args.cpu_smoke:
            rows.append(bench_dense(cfg, timer, cuda, device, notes, chunk))
        else:
            n = cfg["S"] * cfg["D"]
            rows.append(dict(op="dense", **cfg, skipped=f"dense Jacobian would be {n * n * 4 / 1e9:.0f} GB"))
        print(fmt(rows[-1]), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    info = machine_info()
    info["fastjac"] = fj.__version__
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gb=p.total_memory / 1e9, cuda=torch.version.cuda)
    result = dict(
        machine=info,
        match_tol=MATCH_TOL,
        rows=rows,
        notes=notes,
        smoke=bool(args.cpu_smoke),
        attention_flops_per_call=flops,
    )
    name = re.sub(r"[^A-Za-z0-9]+", "_", info["device"]).strip("_").lower()
    path = args.out or os.path.join(HERE, "results", f"gpu_triton_{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    for n_ in notes:
        print("note:", n_)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
