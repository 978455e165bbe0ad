"""Figure 4 at CPU scale: accuracy against the number of recurrent steps T at test time (trained with T = 16).

    python examples/fig4_accuracy_vs_steps.py          # reuses / trains the runs (fastjac.train.experiments)
    python examples/fig4_accuracy_vs_steps.py --quick

For the Original, Spec, E-single, E-multi and Lyapunov (target 0.1) runs, board accuracy on the ID and OOD test
boards at T = 1, 2, 4, 8, 16, 32, 64, 128. Writes examples/out/fig4_accuracy_vs_steps.{png,json}.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import parser, write_json  # noqa: E402

from fastjac.train.experiments import RUNS, accuracy_vs_steps, ensure_runs  # noqa: E402

NAMES = ["original", "spec", "e_single", "e_multi", "lyap_0.1"]
STEPS = (1, 2, 4, 8, 16, 32, 64, 128)


def main():
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = ensure_runs(NAMES, os.path.join(args.out, "runs"), quick=args.quick, jobs=args.jobs, seed=args.seed)
    curves = {}
    for n in NAMES:
        ev = accuracy_vs_steps(res[n]["dir"], steps=STEPS)
        curves[n] = {split: [ev[split][str(t)]["board"] for t in STEPS] for split in ev}
        print(f"{n:10s} ID " + " ".join(f"{v:.3f}" for v in curves[n]["test_id"]) +
              " | OOD " + " ".join(f"{v:.3f}" for v in curves[n]["test_ood"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for a, split in zip(ax, ("test_id", "test_ood")):
        for n in NAMES:
            a.plot(STEPS, curves[n][split], marker="o", label=RUNS[n][0].split(" (")[0])
        a.axvline(16, color="k", lw=0.8, ls="--")
        a.set_xscale("log", base=2)
        a.set_xlabel("recurrent steps T at test time (trained at 16)")
        a.set_title(split)
    ax[0].set_ylabel("board accuracy")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig4_accuracy_vs_steps.png"), dpi=120)
    write_json(os.path.join(args.out, "fig4_accuracy_vs_steps.json"), dict(quick=args.quick, steps=list(STEPS),
                                                                         curves=curves))


if __name__ == "__main__":
    main()
