"""Offline data sets for fastjac's training experiments (nothing is downloaded at run time).

from fastjac.data import sudoku
puzzles, solutions = sudoku.generate(1000, size=4, givens=(7, 10), seed=0)
"""

from . import sudoku

__all__ = ["sudoku"]
