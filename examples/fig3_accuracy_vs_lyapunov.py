"""Figure 3 at CPU scale: accuracy against the finite-horizon lambda_max and mean exponent over a sweep of runs.

    python examples/fig3_accuracy_vs_lyapunov.py           # reuses / trains the sweep (fastjac.train.experiments)
    python examples/fig3_accuracy_vs_lyapunov.py --quick

The sweep: the CPU preset (4x4 Sudoku, ItrSA, D = 32, H = 4, T = 16, 8 epochs) with no regulariser, Spec,
E-single, E-multi, the Jacobian Frobenius and spectral penalties, and the Lyapunov regulariser at targets 0.1 and
-0.5; one point per run (exponents: T = 16 from X0 on 4 held-out boards, dense, float64; board accuracy at
T = 16). Writes examples/out/fig3_accuracy_vs_lyapunov.{png,json} with the Pearson correlations.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from _common import parser, write_json  # noqa: E402

from fastjac.train.experiments import RUNS, ensure_runs  # noqa: E402


def main():
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = list(RUNS)
    res = ensure_runs(names, os.path.join(args.out, "runs"), quick=args.quick, jobs=args.jobs, seed=args.seed)
    pts = [dict(name=n, lambda_max=res[n]["lyapunov"]["max"], lambda_mean=res[n]["lyapunov"]["mean"],
                id_board=res[n]["eval"]["test_id"]["16"]["board"], ood_board=res[n]["eval"]["test_ood"]["16"]["board"])
           for n in names]
    corr = {}
    for xk in ("lambda_max", "lambda_mean"):
        for yk in ("id_board", "ood_board"):
            x, y = np.array([q[xk] for q in pts]), np.array([q[yk] for q in pts])
            corr[f"{yk}~{xk}"] = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else None
    best = max(pts, key=lambda q: q["id_board"])
    for q in pts:
        print(f"{q['name']:10s} lambda_max {q['lambda_max']:+.3f} mean {q['lambda_mean']:+.3f}  "
              f"ID {q['id_board']:.3f} OOD {q['ood_board']:.3f}")
    print("correlations:", corr, "| best run:", best["name"], f"lambda_max {best['lambda_max']:+.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for a, xk, lab in ((ax[0], "lambda_max", "λ_max"), (ax[1], "lambda_mean", "mean λ")):
        for yk, mk in (("id_board", "o"), ("ood_board", "s")):
            a.scatter([q[xk] for q in pts], [q[yk] for q in pts], marker=mk, label=yk.replace("_board", ""))
        for q in pts:
            a.annotate(q["name"], (q[xk], q["id_board"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        a.axvline(0, color="k", lw=0.8)
        a.set_xlabel(f"finite-horizon {lab} (T = 16)")
        a.set_ylabel("board accuracy (T = 16)")
        a.legend()
    fig.suptitle("4x4 Sudoku, ItrSA: accuracy against Lyapunov exponents" + (" [quick]" if args.quick else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig3_accuracy_vs_lyapunov.png"), dpi=120)
    write_json(os.path.join(args.out, "fig3_accuracy_vs_lyapunov.json"), dict(quick=args.quick, points=pts,
                                                                            correlations=corr, best=best))


if __name__ == "__main__":
    main()
