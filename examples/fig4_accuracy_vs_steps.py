"""Figure 4 at CPU scale: accuracy against the number of recurrent steps T at test time (trained with
T = 16), with +-sd bands over seeds.

    python examples/fig4_accuracy_vs_steps.py --jobs 2  # trains what is missing (resumable), evaluates, plots
    python examples/fig4_accuracy_vs_steps.py --no-train  # evaluate / plot the finished runs only
    python examples/fig4_accuracy_vs_steps.py --quick  # 1 epoch of 2000 boards per run, to try it

Grid: Original ItrSA and Original AKOrN (CPU preset, 20 epochs), seeds 0-4; board and cell accuracy, ID and OOD,
at T = 4, 8, 16, 32, 64, 128.

The runs live in runs/sweep/<config>/seed<k>/ (shared with the other figures and ``python -m fastjac.train.sweep``);
every model is evaluated on the sweep's one common held-out test set. Writes examples/out/fig4_sweep.json and the
PNGs (docs/training.md has the committed results, bench/results/sweep*.json).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjac.train.experiments import figure_main  # noqa: E402

if __name__ == "__main__":
    figure_main("fig4", __doc__)
