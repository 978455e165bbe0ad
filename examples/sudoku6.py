"""The harder CPU task: 6x6 Sudoku (2x3 boxes; no solution recall), Original against the Lyapunov
regulariser (tau = -0.3, the best regulariser of the 4x4 Fig. 5 sweep).

    python examples/sudoku6.py --jobs 2  # trains what is missing (resumable), evaluates, plots
    python examples/sudoku6.py --no-train  # evaluate / plot the finished runs only
    python examples/sudoku6.py --quick  # 1 epoch of 2000 boards per run, to try it

Grid: preset cpu6 (6x6 boards, ItrSA D = 32, H = 4, T = 16, 16000 boards, 30 epochs), Original and Lyapunov
tau = -0.3, seeds 0-2.

The runs live in runs/sweep/<config>/seed<k>/ (shared with the other figures and ``python -m fastjac.train.sweep``);
every model is evaluated on the sweep's one common held-out test set. Writes examples/out/sudoku6_sweep.json and the
PNGs (docs/training.md has the committed results, bench/results/sweep*.json).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjac.train.experiments import figure_main  # noqa: E402

if __name__ == "__main__":
    figure_main("sudoku6", __doc__)
