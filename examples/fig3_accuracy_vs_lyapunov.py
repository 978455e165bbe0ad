"""Figure 3, controlled, at CPU scale: Lyapunov-regularised training towards a target lambda_max, then
accuracy against the lambda_max reached.

    python examples/fig3_accuracy_vs_lyapunov.py --jobs 2  # trains what is missing (resumable), evaluates, plots
    python examples/fig3_accuracy_vs_lyapunov.py --no-train  # evaluate / plot the finished runs only
    python examples/fig3_accuracy_vs_lyapunov.py --quick  # 1 epoch of 2000 boards per run, to try it

Grid: the CPU preset (4x4 Sudoku, ItrSA, D = 32, H = 4, T = 16, 20 epochs) with the Lyapunov penalty
(weight 1 per board, k = 4, one alignment pass, 4 boards a step, every 2nd step, warm-up 250 + ramp 250 steps)
towards tau in {-0.3, -0.15, 0, +0.1, +0.3}, seeds 0-2. The paper could only vary eta, the input scale and the
weight norms; setting lambda_max directly tests whether criticality causes accuracy. Figure: achieved lambda_max
(16 held-out boards, dense, float64) against tau, and accuracy against achieved lambda_max.

The runs live in runs/sweep/<config>/seed<k>/ (shared with the other figures and ``python -m fastjac.train.sweep``);
every model is evaluated on the sweep's one common held-out test set. Writes examples/out/fig3_sweep.json and the
PNGs (docs/training.md has the committed results, bench/results/sweep*.json).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjac.train.experiments import figure_main  # noqa: E402

if __name__ == "__main__":
    figure_main("fig3", __doc__)
