"""Sudoku puzzles with unique solutions, generated offline and cached, plus loaders for the public file formats.

    puzzles, solutions = generate(1000, size=9, givens=(31, 42), seed=0)   # int64 [n, 81]; 0 = blank
    split = splits(size=4, seed=0)                                         # train / test_id / test_ood dicts

Boards are ``size x size`` with ``size = b*b`` (4: 2x2 boxes, 9: 3x3 boxes) or 6 (2x3 boxes: 2 rows, 3 columns),
flattened row-major into ``size*size`` cells. Puzzles hold 0 for a blank and 1..size for a given; solutions hold 1..size.

Generation. A full grid is drawn by a randomised backtracking fill of the empty board (bitmask solver, minimum
remaining values, candidates in random order), then cells are removed in random order, each removal kept only if
the puzzle still has exactly one solution (a complete search that stops at two solutions), until the number of
givens drawn uniformly from ``givens`` is reached. If no further cell can be removed first (a *minimal* puzzle with
more givens than asked), the puzzle is kept when its count is still inside the range and otherwise redrawn from a
fresh grid. Puzzle i depends only on ``(seed, i, size, givens)``, so ``generate(n)`` is a prefix of
``generate(n + m)``.

What the generator reaches (measured on 100 puzzles, seed 0): the hard split :data:`OOD_GIVENS` asks for the
paper's 17-34 givens (RRN "sudoku-hard"), but random-order removal stops at minimal puzzles of 22 or more givens:
the realised 9x9 counts are 22-34 (median 26; 8% at 22-23), about 19 ms a puzzle. Ranges that lie wholly below ~22
(e.g. (17, 21)) are refused after 200 fresh grids with a RuntimeError. The in-distribution range 31-42 costs about
4 ms a puzzle. 4x4 boards reach 4 givens (the minimum for a unique 4x4 puzzle) in well under 1 ms.
6x6 boards (the CPU-scale task without solution recall: ~2.8e7 solution grids, where every 4x4 training set holds
all 288 4x4 grids): random-order removal ends at minimal puzzles of 9-12 givens (60 grids: 9: 8, 10: 32, 11: 19,
12: 1); ID 18-22 givens (3.4 ms a puzzle), OOD 10-14 (5.4 ms).

Loaders (for users who have the files; no network access): :func:`load_csv` reads the RRN sudoku-hard CSVs
(``puzzle,solution`` per line, 81 digits, 0 = blank, no header) and Kaggle-style CSVs with a header
(``quizzes,solutions``; '.' also accepted for a blank); :func:`load_satnet` reads SATNet's ``features.pt`` /
``labels.pt`` one-hot tensors (loaded with ``weights_only=True``); :func:`load_numpy` reads ``.npy`` / ``.npz``.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from typing import Dict, Optional, Tuple

import numpy as np

#: the paper's in-distribution split (SATNet: 31-42 givens) and the generator's hard split, per board size
ID_GIVENS = {9: (31, 42), 4: (8, 10), 6: (18, 22)}
OOD_GIVENS = {9: (17, 34), 4: (4, 6), 6: (10, 14)}
SIZES = (4, 6, 9)
#: box shape (rows, columns) per board side: 6x6 boards have 2x3 boxes (2 rows, 3 columns; 3 x 2 of them)
BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}


# ------------------------------------------------------------------------------------------------- solver


class _Board:
    """Index tables of one board size: row, column and box of every cell."""

    _cache: Dict[int, "_Board"] = {}

    def __init__(self, n: int):
        b = math.isqrt(n)
        br, bc = BOXES.get(n, (b, b))  # box rows, box columns (2x3 for 6x6)
        self.n, self.b, self.full = n, b, (1 << n) - 1
        self.rows = [i // n for i in range(n * n)]
        self.cols = [i % n for i in range(n * n)]
        self.boxes = [(i // n // br) * (n // bc) + (i % n) // bc for i in range(n * n)]

    @classmethod
    def get(cls, n: int) -> "_Board":
        if n not in cls._cache:
            cls._cache[n] = _Board(n)
        return cls._cache[n]


def _solve(cells, n: int, limit: int = 2, rng: Optional[random.Random] = None):
    """Search the board ``cells`` (list of ints, 0 blank). Returns (number of solutions found up to ``limit``,
    the first solution found or None). With ``rng`` candidates are tried in random order (random fill)."""
    bd = _Board.get(n)
    R, Cc, Bx = bd.rows, bd.cols, bd.boxes
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    grid = list(cells)
    empties = []
    for i, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            r, c, x = R[i], Cc[i], Bx[i]
            if (rows[r] | cols[c] | boxes[x]) & bit:
                return 0, None
            rows[r] |= bit
            cols[c] |= bit
            boxes[x] |= bit
        else:
            empties.append(i)
    full = bd.full
    found = [0, None]

    def rec(m: int) -> bool:  # m: number of empties still open (they are empties[:m]); True = stop
        if m == 0:
            found[0] += 1
            if found[1] is None:
                found[1] = list(grid)
            return found[0] >= limit
        best, best_j, best_cnt = 0, -1, n + 1
        for j in range(m):  # minimum remaining values
            i = empties[j]
            cand = full & ~(rows[R[i]] | cols[Cc[i]] | boxes[Bx[i]])
            cnt = bin(cand).count("1")
            if cnt < best_cnt:
                best, best_j, best_cnt = cand, j, cnt
                if cnt <= 1:
                    break
        if best_cnt == 0:
            return False
        i = empties[best_j]
        empties[best_j], empties[m - 1] = empties[m - 1], empties[best_j]
        r, c, x = R[i], Cc[i], Bx[i]
        digits = [d for d in range(n) if best >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[x] |= bit
            grid[i] = d + 1
            stop = rec(m - 1)
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[x] &= ~bit
            grid[i] = 0
            if stop:
                empties[best_j], empties[m - 1] = empties[m - 1], empties[best_j]
                return True
        empties[best_j], empties[m - 1] = empties[m - 1], empties[best_j]
        return False

    rec(len(empties))
    return found[0], found[1]


def count_solutions(puzzle, *, limit: int = 2) -> int:
    """Number of solutions of one puzzle ([size*size] ints, 0 = blank), counted up to ``limit``."""
    p = [int(v) for v in np.asarray(puzzle).reshape(-1)]
    n = _check_board_len(len(p))
    return _solve(p, n, limit)[0]


def solve(puzzle) -> Optional[np.ndarray]:
    """One solution of a puzzle ([size*size] ints, 0 = blank) as an int64 array, or None if it has none."""
    p = [int(v) for v in np.asarray(puzzle).reshape(-1)]
    n = _check_board_len(len(p))
    sol = _solve(p, n, 1)[1]
    return None if sol is None else np.asarray(sol, dtype=np.int64)


def _check_board_len(L: int) -> int:
    n = math.isqrt(L)
    if n * n != L or (math.isqrt(n) ** 2 != n and n not in BOXES):
        raise ValueError(
            f"puzzle: expected size*size cells with size a square (4, 9, 16) or 6 (2x3 boxes), got {L} cells"
        )
    return n


# ---------------------------------------------------------------------------------------------- generator


def _one(size: int, lo: int, hi: int, seed: int, i: int) -> Tuple[list, list, int]:
    # puzzle i's own stream: independent of n and of the other puzzles
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}/{i}/{size}/{lo}/{hi}".encode()).digest()[:8], "little"))
    n2 = size * size
    for attempt in range(200):
        _, sol = _solve([0] * n2, size, 1, rng)
        target = rng.randint(lo, hi)
        puz = list(sol)
        order = list(range(n2))
        rng.shuffle(order)
        count = n2
        for cell in order:
            if count <= target:
                break
            v = puz[cell]
            puz[cell] = 0
            if _solve(puz, size, 2)[0] == 1:
                count -= 1
            else:
                puz[cell] = v
        if lo <= count <= hi:
            return puz, sol, attempt
    raise RuntimeError(
        f"givens: could not reach {lo}..{hi} givens on a {size}x{size} board in 200 fresh grids; 9x9 random removal rarely goes below 22 givens"
    )


def _check_args(n, size, givens, seed):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    if givens is None:
        givens = ID_GIVENS[size]
    import numbers

    if (
        isinstance(givens, (str, bytes))
        or not hasattr(givens, "__len__")
        or len(givens) != 2
        or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in givens)
    ):
        raise ValueError(f"givens: expected a pair of ints (lo, hi), got {givens!r}")
    lo, hi = int(givens[0]), int(givens[1])
    if not (1 <= lo <= hi <= size * size):
        raise ValueError(f"givens: expected 1 <= lo <= hi <= {size * size}, got {givens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    return lo, hi


#: part of every cache file's name and content: bump it when the generator's output for a given key changes
GENERATOR_VERSION = 1


def _cache_problem(P: np.ndarray, S: np.ndarray, size: int) -> Optional[str]:
    """Why cached arrays cannot be puzzles of this size with their solutions (None: they can). Checked: shapes,
    value ranges, givens equal to the solution, every solution a valid grid (each row, column and box a
    permutation of 1..size) and, on the first 8 puzzles, exactly one solution."""
    cells = size * size
    if P.ndim != 2 or S.ndim != 2 or P.shape != S.shape or P.shape[1] != cells:
        return f"shapes {P.shape} and {S.shape}, expected two [n, {cells}]"
    if len(P) == 0:
        return None
    if P.min() < 0 or P.max() > size or S.min() < 1 or S.max() > size:
        return f"values outside 0..{size} (puzzles) or 1..{size} (solutions)"
    if not ((P == 0) | (P == S)).all():
        return "givens that differ from their solution"
    grid = S.reshape(-1, size, size)
    want = np.arange(1, size + 1)
    groups = [grid, grid.transpose(0, 2, 1)]
    b = math.isqrt(size)
    if b * b == size:
        groups.append(grid.reshape(-1, b, b, b, b).transpose(0, 1, 3, 2, 4).reshape(-1, size, size))
    for g in groups:
        if not (np.sort(g, axis=-1) == want).all():
            return "a solution that is not a valid grid (a row, column or box repeats a digit)"
    if b * b == size:
        for i in range(min(8, len(P))):
            if count_solutions(P[i]) != 1:
                return f"puzzle {i} without a unique solution"
    return None


def default_cache_dir() -> str:
    """``$FASTJAC_CACHE/sudoku`` or ``~/.cache/fastjac/sudoku``."""
    root = os.environ.get("FASTJAC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastjac")
    return os.path.join(root, "sudoku")


def generate(
    n: int,
    *,
    size: int = 9,
    givens: Optional[Tuple[int, int]] = None,
    seed: int = 0,
    cache: bool = True,
    cache_dir: Optional[str] = None,
    progress: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` puzzles with exactly one solution each, and their solutions.

    Args:
        n: number of puzzles. size: 4 or 9. givens: (lo, hi), the number of givens of each puzzle is drawn
            uniformly in this range (default :data:`ID_GIVENS` of the size: 31-42 for 9x9, SATNet's range).
        seed: puzzle i depends only on (seed, i, size, givens).
        cache: read/write ``cache_dir`` (default :func:`default_cache_dir`): an ``.npz`` per (size, givens, seed,
            :data:`GENERATOR_VERSION`) holding the longest prefix generated so far; written atomically. A cache
            that is not valid puzzles and solutions (:func:`_cache_problem`) is regenerated with a warning; one
            that cannot be written warns and the puzzles are returned anyway.
        progress: a tqdm bar.

    Returns:
        (puzzles, solutions): int64 [n, size*size]; puzzles 0 = blank, 1..size = given; solutions 1..size.

    Example:
        >>> P, S = generate(3, size=4, givens=(6, 8), seed=1, cache=False)
        >>> P.shape, bool(((P == 0) | (P == S)).all()), bool(((P > 0).sum(1) >= 6).all())
        ((3, 16), True, True)
    """
    lo, hi = _check_args(n, size, givens, seed)
    path = None
    P = np.zeros((0, size * size), np.int64)
    S = np.zeros((0, size * size), np.int64)
    if cache:
        d = cache_dir or default_cache_dir()
        path = os.path.join(d, f"sudoku{size}_g{lo}-{hi}_s{seed}_v{GENERATOR_VERSION}.npz")
        if os.path.exists(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    P, S = z["puzzles"].astype(np.int64), z["solutions"].astype(np.int64)
                    version = int(z["version"]) if "version" in z else None
                why = _cache_problem(P, S, size) or (
                    None if version == GENERATOR_VERSION else f"generator version {version}"
                )
            except Exception as e:  # unreadable
                why = f"unreadable: {type(e).__name__}"
            if why is not None:  # a wrong cache is regenerated, never trusted
                import warnings

                warnings.warn(
                    f"generate: ignoring the Sudoku cache {path!r} ({why}); regenerating", RuntimeWarning, stacklevel=2
                )
                P = np.zeros((0, size * size), np.int64)
                S = np.zeros((0, size * size), np.int64)
    if len(P) < n:
        from tqdm.auto import tqdm

        new_p, new_s = [], []
        for i in tqdm(range(len(P), n), disable=not progress, desc=f"sudoku{size}", unit="puzzle"):
            p, s, _ = _one(size, lo, hi, seed, i)
            new_p.append(p)
            new_s.append(s)
        P = np.concatenate([P, np.asarray(new_p, np.int64).reshape(-1, size * size)])
        S = np.concatenate([S, np.asarray(new_s, np.int64).reshape(-1, size * size)])
        if path is not None:
            tmp = path + f".tmp{os.getpid()}.npz"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                np.savez_compressed(tmp, puzzles=P, solutions=S, version=np.int64(GENERATOR_VERSION))
                os.replace(tmp, path)
            except OSError as e:  # an unwritable cache costs the cache, never the puzzles just generated
                import warnings

                try:
                    os.remove(tmp)
                except OSError:
                    pass
                warnings.warn(
                    f"generate: could not write the Sudoku cache {path!r} ({e.strerror or e}); the "
                    f"puzzles are returned uncached (set cache_dir= or FASTJAC_CACHE to a writable "
                    f"folder)",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return P[:n].copy(), S[:n].copy()


def splits(
    size: int = 4,
    *,
    n_train: int = 10000,
    n_test: int = 1000,
    seed: int = 0,
    cache: bool = True,
    cache_dir: Optional[str] = None,
    progress: bool = False,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The train / in-distribution test / out-of-distribution test sets of the paper's protocol.

    train and test_id draw from :data:`ID_GIVENS` (different seeds: disjoint streams); test_ood from
    :data:`OOD_GIVENS` (fewer givens: harder). Returns {"train": (P, S), "test_id": ..., "test_ood": ...}.
    """
    kw = dict(size=size, cache=cache, cache_dir=cache_dir, progress=progress)
    return {
        "train": generate(n_train, givens=ID_GIVENS[size], seed=seed, **kw),
        "test_id": generate(n_test, givens=ID_GIVENS[size], seed=seed + 1_000_003, **kw),
        "test_ood": generate(n_test, givens=OOD_GIVENS[size], seed=seed + 2_000_003, **kw),
    }


# ------------------------------------------------------------------------------------------------ loaders


def _digits(s: str, name: str) -> list:
    s = s.strip()
    out = []
    for ch in s:
        if ch in ".0":
            out.append(0)
        elif ch.isdigit():
            out.append(int(ch))
        else:
            raise ValueError(f"{name}: unexpected character {ch!r} in {s[:20]!r}...")
    return out


def load_csv(path: str, *, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read puzzles from a CSV of ``puzzle,solution`` lines: the RRN "sudoku-hard" files (train/valid/test.csv,
    no header, 81 digits, 0 = blank) and Kaggle-style files with a header line (``quizzes,solutions``); '.' is
    read as a blank too. Returns int64 (puzzles, solutions) [n, 81] (or [n, 16] for 4x4 files)."""
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    P, S = [], []
    with open(path) as f:
        for ln, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            parts = line.split(",")
            if len(parts) < 2:
                raise ValueError(f"path: line {ln + 1} of {path!r} is not 'puzzle,solution'")
            if ln == 0 and not parts[0].strip()[:1].isdigit() and parts[0].strip()[:1] != ".":
                continue  # header
            p, s = _digits(parts[0], "puzzle"), _digits(parts[1], "solution")
            if len(p) != len(s):
                raise ValueError(f"path: line {ln + 1} of {path!r}: puzzle and solution lengths differ")
            _check_board_len(len(p))
            P.append(p)
            S.append(s)
            if limit is not None and len(P) >= limit:
                break
    return np.asarray(P, np.int64), np.asarray(S, np.int64)


def _onehot_to_digits(t) -> np.ndarray:
    a = np.asarray(t)
    a = a.reshape(a.shape[0], -1, a.shape[-1])  # [N, cells, size]
    return np.where(a.sum(-1) > 0, a.argmax(-1) + 1, 0).astype(np.int64)


def load_satnet(folder: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read SATNet's sudoku folder: ``features.pt`` and ``labels.pt``, one-hot [N, 9, 9, 9] tensors (a cell with
    no bit set is blank). Loaded with ``torch.load(weights_only=True)``: tensors only, nothing is unpickled."""
    import torch

    paths = [os.path.join(folder, f) for f in ("features.pt", "labels.pt")]
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"folder: expected SATNet's features.pt and labels.pt in {folder!r}; {p!r} is missing")
    feats, labels = (torch.load(p, map_location="cpu", weights_only=True) for p in paths)
    return _onehot_to_digits(feats.numpy()), _onehot_to_digits(labels.numpy())


def load_numpy(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read an ``.npz`` with arrays ``puzzles`` and ``solutions`` (as :func:`generate` caches them), or an ``.npy``
    of shape [n, 2, cells]. Loaded with ``allow_pickle=False``."""
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "puzzles" not in z or "solutions" not in z:
                raise ValueError(f"path: {path!r} lacks the arrays 'puzzles' and 'solutions' (has {list(z.keys())})")
            return z["puzzles"].astype(np.int64), z["solutions"].astype(np.int64)
    a = np.load(path, allow_pickle=False)
    if a.ndim != 3 or a.shape[1] != 2:
        raise ValueError(f"path: expected an array [n, 2, cells] in {path!r}, got shape {a.shape}")
    return a[:, 0].astype(np.int64), a[:, 1].astype(np.int64)


__all__ = [
    "generate",
    "splits",
    "solve",
    "count_solutions",
    "load_csv",
    "load_satnet",
    "load_numpy",
    "ID_GIVENS",
    "OOD_GIVENS",
    "default_cache_dir",
    "GENERATOR_VERSION",
]
