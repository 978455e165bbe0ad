"""Figure 5 at CPU scale: Original vs Spec vs E-single vs E-multi, and fastjac's Lyapunov regulariser.

    python examples/fig5_regularizers.py            # trains the runs it needs once (tens of minutes on 2 cores)
    python examples/fig5_regularizers.py --quick    # 1 epoch each: a smoke run

Each run is the CPU preset (4x4 Sudoku, ItrSA, D = 32, H = 4, T = 16) for 8 epochs (fastjac.train.experiments),
with one regulariser. The figure shows board accuracy (ID and OOD, T = 16) and the finite-horizon lambda_max and
mean exponent of the trained core (T = 16 from X0, 4 held-out boards, dense, float64). Writes
examples/out/fig5_regularizers.{png,json}.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import parser, write_json  # noqa: E402

from fastjac.train.experiments import RUNS, ensure_runs  # noqa: E402

NAMES = ["original", "spec", "e_single", "e_multi", "lyap_0.1", "lyap_-0.5"]


def main():
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = ensure_runs(NAMES, os.path.join(args.out, "runs"), quick=args.quick, jobs=args.jobs, seed=args.seed)
    rows = []
    for n in NAMES:
        r = res[n]
        rows.append(dict(name=n, label=RUNS[n][0], id_board=r["eval"]["test_id"]["16"]["board"],
                         ood_board=r["eval"]["test_ood"]["16"]["board"], id_cell=r["eval"]["test_id"]["16"]["cell"],
                         ood_cell=r["eval"]["test_ood"]["16"]["cell"], lambda_max=r["lyapunov"]["max"],
                         lambda_mean=r["lyapunov"]["mean"], train_time_s=r["train_time_s"],
                         eval=r["eval"]))
        print(f"{RUNS[n][0]:38s} ID board {rows[-1]['id_board']:.3f}  OOD board {rows[-1]['ood_board']:.3f}  "
              f"lambda_max {rows[-1]['lambda_max']:+.3f}  mean {rows[-1]['lambda_mean']:+.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(rows))
    ax[0].bar([i - 0.2 for i in x], [r["id_board"] for r in rows], 0.4, label="ID (8-10 givens)")
    ax[0].bar([i + 0.2 for i in x], [r["ood_board"] for r in rows], 0.4, label="OOD (4-6 givens)")
    ax[0].set_ylabel("board accuracy (T = 16)")
    ax[1].bar([i - 0.2 for i in x], [r["lambda_max"] for r in rows], 0.4, label="λ_max")
    ax[1].bar([i + 0.2 for i in x], [r["lambda_mean"] for r in rows], 0.4, label="mean λ")
    ax[1].axhline(0, color="k", lw=0.8)
    ax[1].set_ylabel("finite-horizon exponent (T = 16)")
    for a in ax:
        a.set_xticks(list(x))
        a.set_xticklabels([r["label"].split(" (")[0] for r in rows], rotation=25, ha="right")
        a.legend()
    fig.suptitle("4x4 Sudoku, ItrSA (D=32, H=4): regularisers" + (" [quick]" if args.quick else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig5_regularizers.png"), dpi=120)
    write_json(os.path.join(args.out, "fig5_regularizers.json"), dict(quick=args.quick, runs=rows))
    print(f"wrote {os.path.join(args.out, 'fig5_regularizers.png')}")


if __name__ == "__main__":
    main()
