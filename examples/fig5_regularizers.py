"""Figure 5 at CPU scale: accuracy per regulariser over seeds (mean +- sd, same-seed differences against
the unregularised run).

    python examples/fig5_regularizers.py --jobs 2  # trains what is missing (resumable), evaluates, plots
    python examples/fig5_regularizers.py --no-train  # evaluate / plot the finished runs only
    python examples/fig5_regularizers.py --quick  # 1 epoch of 2000 boards per run, to try it

Grid: Original, Spec (1e-5, 1e-4, 1e-3), E-single 1e-3, E-multi 1e-3 (orthogonal W^V, W^O), Jacobian Frobenius
1e-3 and spectral 1e-2 (CPU preset, 20 epochs), seeds 0-4; the Lyapunov runs of fig3 join the figure when they
have finished.

The runs live in runs/sweep/<config>/seed<k>/ (shared with the other figures and ``python -m fastjac.train.sweep``);
every model is evaluated on the sweep's one common held-out test set. Writes examples/out/fig5_sweep.json and the
PNGs (docs/training.md has the committed results, bench/results/sweep*.json).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjac.train.experiments import figure_main  # noqa: E402

if __name__ == "__main__":
    figure_main("fig5", __doc__)
