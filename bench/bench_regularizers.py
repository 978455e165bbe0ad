"""Benchmark: the cost of each regulariser in a training step, against the plain step and against torch.func.

    python bench/bench_regularizers.py                # the CPU preset's model (4x4 Sudoku, D = 32, H = 4, T = 16)
    python bench/bench_regularizers.py --quick        # fewer repetitions

Baseline 1, the plain training step: forward of T = 16 recurrent steps on a batch of 64 boards, cross-entropy,
backward, Adam step. Each regularised step adds one term to the loss the way ``fastjac.train.loop`` does
(Jacobian terms on the first ``reg_samples`` boards: 8 by default, and also on the whole batch), and the ratio
``regularised / plain`` is reported (target: <= 1.5 at k = 4 probes).

Baseline 2, the same quantity by torch.func (bench/baselines.py: ``vmap_jvp``): the Hutchinson estimate as
``vmap(jvp)`` of the plain forward with the same probes, and the Lyapunov exponents as ``vmap(jvp)`` + Householder
QR per step; value + backward, timed against fastjac's analytic version in the same process. A speedup is printed
only if both give the same value (relative difference below 1e-4 in float32).
Results: bench/results/regularizers_cpu.json with the machine and versions.
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

from baselines import vmap_jvp  # noqa: E402
from machine import machine_info  # noqa: E402

from fastjac.data import sudoku  # noqa: E402
from fastjac.train import regularizers as R  # noqa: E402
from fastjac.train.loop import TrainConfig, build_net, regularizer_terms  # noqa: E402
from fastjac.train.sudoku_models import sudoku_loss  # noqa: E402


def timeit(fn, min_time=1.0, min_reps=3):
    fn()  # warm-up
    reps, t0 = 0, time.perf_counter()
    times = []
    while reps < min_reps or time.perf_counter() - t0 < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        reps += 1
    times.sort()
    return times[len(times) // 2]


def make_step(cfg, net, opt, P, S):
    """``cfg.reg_every`` consecutive training steps as the loop takes them (the terms on every reg_every-th), so
    the time per call / reg_every is the amortised step time."""

    def run():
        for step in range(cfg.reg_every):
            logits, xs, C = net(P, return_states=True)
            loss = sudoku_loss(logits, S)
            terms = regularizer_terms(cfg, net, xs, C, step)
            loss = loss + sum(getattr(cfg, k) * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def torchfunc_hutchinson(core, X, C, V):
    return torch.stack(
        [vmap_jvp(core, X[b], V[:, b], C=C[b]).pow(2).sum(dim=(-2, -1)).mean(0) for b in range(X.shape[0])]
    ).mean()


def torchfunc_lyapunov(core, X0, C, k, horizon, seed):
    B, S, D = X0.shape
    n = S * D
    out = []
    for b in range(B):
        Q = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed + b), dtype=torch.float64))[
            0
        ].to(X0.dtype)
        Rp, X = None, X0[b]
        for _ in range(horizon):
            W = vmap_jvp(core, X, Q.T.reshape(k, S, D), C=C[b]).reshape(k, n).T
            X = core(X, C[b])
            Qm, Rm = torch.linalg.qr(W.double())
            sg = torch.sign(torch.diagonal(Rm)).detach()
            Qm, Rm = Qm * sg, Rm * sg[:, None]
            Rp = Rm if Rp is None else Rm @ Rp
            Q = Qm.to(X0.dtype)
        out.append(torch.linalg.svdvals(Rp).log() / horizon)
    return torch.stack(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument(
        "--lyap-only",
        action="store_true",
        help="only the Lyapunov cases (plain step timed before and after them; results/regularizers_lyap_cpu.json)",
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(
        HERE, "results", "regularizers_lyap_cpu.json" if args.lyap_only else "regularizers_cpu.json"
    )
    torch.set_num_threads(args.threads)
    mt = 0.3 if args.quick else 1.5
    base = TrainConfig.preset("cpu")
    P, S = sudoku.generate(base.batch_size, size=base.size, seed=0, cache=False)
    P, S = torch.from_numpy(P), torch.from_numpy(S)
    results = dict(
        machine=machine_info(),
        load_average_at_start=os.getloadavg(),
        model=dict(
            kind=base.kind, size=base.size, dim=base.dim, heads=base.heads, steps=base.steps, batch=base.batch_size
        ),
        step_ratios={},
        torch_func={},
    )

    def step_time(**kw):
        cfg = TrainConfig.preset("cpu", **kw)
        net = build_net(cfg)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        return timeit(make_step(cfg, net, opt, P, S), mt) / cfg.reg_every

    def make(**kw):
        cfg = TrainConfig.preset("cpu", **kw)
        net = build_net(cfg)
        return make_step(cfg, net, torch.optim.Adam(net.parameters(), lr=1e-3), P, S)

    if args.lyap_only:
        lyap_cases(results, make, args.out, rounds=5 if args.quick else 15)
        return
    plain = step_time()
    results["plain_step_s"] = plain
    print(f"plain training step (batch {base.batch_size}, T={base.steps}): {plain * 1e3:.1f} ms")
    cases = [
        ("spec", dict(spec=1e-4)),
        ("e_single", dict(e_single=1e-3)),
        ("e_multi", dict(e_multi=1e-3)),
        ("e_multi_hard", dict(e_multi_hard=True)),
        ("jac_frob k=4, 8 boards", dict(jac_frob=1e-2, probes=4)),
        ("jac_frob k=4, all 64 boards", dict(jac_frob=1e-2, probes=4, reg_samples=64)),
        ("jac_spec 2 iters, 8 boards", dict(jac_spec=1e-2, jac_iters=2)),
        ("jac_spec 2 iters, all 64 boards", dict(jac_spec=1e-2, jac_iters=2, reg_samples=64)),
        ("lyap k=4 T=16, 8 boards", dict(lyap=1e-1, lyap_k=4)),
        ("lyap k=4 T=16, 2 boards", dict(lyap=1e-1, lyap_k=4, reg_samples=2)),
    ]
    for name, kw in cases:
        t = step_time(**kw)
        results["step_ratios"][name] = dict(seconds=t, ratio=t / plain)
        print(f"  + {name:32s} {t * 1e3:7.1f} ms   {t / plain:5.2f}x plain")

    # against torch.func, the regulariser alone (value + backward), float32
    cfg = TrainConfig.preset("cpu")
    net = build_net(cfg)
    core = net.core
    with torch.no_grad():
        X0, C = net.inputs(P[:8])
        X = net.core(X0, C)
    V = R._probes(X, 4, 0, "rademacher")

    def ours_h():
        core.zero_grad(set_to_none=True)
        R.jacobian_frobenius(core, X, C=C, probes=4, seed=0).backward()

    def ref_h():
        core.zero_grad(set_to_none=True)
        torchfunc_hutchinson(core, X, C, V).backward()

    a = R.jacobian_frobenius(core, X, C=C, probes=4, seed=0).item()
    b = torchfunc_hutchinson(core, X, C, V).item()
    ok = abs(a - b) / abs(b) < 1e-4
    th, tr = timeit(ours_h, mt), timeit(ref_h, mt)
    results["torch_func"]["hutchinson k=4, 8 boards"] = dict(
        fastjac_s=th, torch_func_s=tr, agree=ok, speedup=tr / th if ok else None, values=[a, b]
    )
    print(
        f"Hutchinson (value + backward): fastjac {th * 1e3:.1f} ms, vmap(jvp) {tr * 1e3:.1f} ms"
        + (f", {tr / th:.2f}x" if ok else " (values differ: no speedup reported)")
    )

    def ours_l():
        core.zero_grad(set_to_none=True)
        R.lyapunov(core, X0, C=C, horizon=16, k=4, seed=0)[:, 0].sum().backward()

    def ref_l():
        core.zero_grad(set_to_none=True)
        torchfunc_lyapunov(core, X0, C, 4, 16, 0)[:, 0].sum().backward()

    a = R.lyapunov(core, X0, C=C, horizon=16, k=4, seed=0).detach()
    b = torchfunc_lyapunov(core, X0, C, 4, 16, 0).detach()
    ok = bool(((a - b).abs() / b.abs().clamp_min(1e-3)).max() < 1e-3)
    tl, trl = timeit(ours_l, mt), timeit(ref_l, mt)
    results["torch_func"]["lyapunov k=4 T=16, 8 boards"] = dict(
        fastjac_s=tl, torch_func_s=trl, agree=ok, speedup=trl / tl if ok else None
    )
    print(
        f"Lyapunov k=4, T=16 (value + backward): fastjac {tl * 1e3:.1f} ms, vmap(jvp)+QR {trl * 1e3:.1f} ms"
        + (f", {trl / tl:.2f}x" if ok else " (values differ: no speedup reported)")
    )
    results["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


_L = dict(lyap=1.0, lyap_k=4, lyap_iters=1)
LYAP_CASES = [  # (name, TrainConfig overrides, implementation): lyap k=4, T=16 on lyap_boards boards of the batch of 64
    # "kframe": the previous version (lambda_max = lyapunov(...)[:, 0], k tangents and QRs differentiated);
    # "ritz": lyapunov_max (one differentiable tangent, the Ritz vector; same value and gradient), the current one
    ("k-frame (previous), iters=0, 4 boards", dict(_L, lyap_iters=0, lyap_boards=4), "kframe"),
    ("k-frame (previous), iters=1, 4 boards", dict(_L, lyap_boards=4), "kframe"),
    ("k-frame (previous), iters=1, 4 boards, reg_every 2", dict(_L, lyap_boards=4, reg_every=2), "kframe"),
    ("Ritz, iters=1, 1 board", dict(_L, lyap_boards=1), "ritz"),
    ("Ritz, iters=1, 4 boards", dict(_L, lyap_boards=4), "ritz"),
    ("Ritz, iters=1, 8 boards (the loop's default: reg_samples)", dict(_L, lyap_boards=8), "ritz"),
    ("k-frame (previous), iters=1, 8 boards", dict(_L, lyap_boards=8), "kframe"),
    ("Ritz, iters=1, 4 boards, reg_every 2 (Fig. 3 runs)", dict(_L, lyap_boards=4, reg_every=2), "ritz"),
    ("Ritz, iters=1, 4 boards, reg_every 4", dict(_L, lyap_boards=4, reg_every=4), "ritz"),
    ("Ritz, iters=1, 8 boards, reg_every 4", dict(_L, lyap_boards=8, reg_every=4), "ritz"),
    ("Ritz, iters=1, 16 boards, reg_every 8", dict(_L, lyap_boards=16, reg_every=8), "ritz"),
]


def _kframe_max(step, X0, **kw):
    """The previous implementation of the penalty's lambda_max: the k-tangent frame differentiated through."""
    return R.lyapunov(step, X0, **kw)[..., 0]


def lyap_cases(results, make, out, rounds=15):
    """The Lyapunov step's overhead. This machine's timings drift by 2x within a minute (shared VM), so the cases
    are interleaved: every round times the plain step and each case once (a case = ``reg_every`` consecutive
    steps, divided by ``reg_every``), and a case's ratio is the median over rounds of (case / plain of the same
    round)."""
    import statistics

    ritz = R.lyapunov_max
    fns = {"plain": (make(), "ritz", 1)}
    for name, kw, impl in LYAP_CASES:
        fns[name] = (make(**kw), impl, kw.get("reg_every", 1))
    per = {name: [] for name in fns}
    try:
        for r in range(rounds + 1):  # round 0 is the warm-up
            for name, (fn, impl, every) in fns.items():
                R.lyapunov_max = _kframe_max if impl == "kframe" else ritz
                t = time.perf_counter()
                fn()
                if r:
                    per[name].append((time.perf_counter() - t) / every)
    finally:
        R.lyapunov_max = ritz
    plain = per["plain"]
    results["plain_step_s"] = dict(median=statistics.median(plain), min=min(plain), max=max(plain), rounds=rounds)
    print(
        f"plain training step: median {statistics.median(plain) * 1e3:.1f} ms ({min(plain) * 1e3:.1f} ... "
        f"{max(plain) * 1e3:.1f}) over {rounds} rounds"
    )
    for name, ts in per.items():
        if name == "plain":
            continue
        ratios = sorted(t / p for t, p in zip(ts, plain))
        q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
        results["step_ratios"][name] = dict(
            seconds=statistics.median(ts), ratio=statistics.median(ratios), ratio_q25=q(0.25), ratio_q75=q(0.75)
        )
        print(
            f"  + {name:54s} {statistics.median(ts) * 1e3:7.1f} ms   {statistics.median(ratios):5.2f}x plain "
            f"(quartiles {q(0.25):.2f} ... {q(0.75):.2f})"
        )
    results["load_average_at_end"] = os.getloadavg()
    results["threads"] = torch.get_num_threads()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
