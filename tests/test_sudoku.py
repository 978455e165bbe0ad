"""fastjac.data.sudoku: unique solutions (checked by an independent solver), given counts, determinism, cache,
loaders."""

import os

import numpy as np
import pytest

from fastjac.data import sudoku


def _box(n):
    """Box rows x columns, written out here (not taken from the generator): 6x6 boards have 2x3 boxes."""
    return (2, 3) if n == 6 else (int(round(n**0.5)),) * 2


def _independent_count(puzzle, n, limit=2):
    """A plain recursive solver with sets (no bitmasks, no MRV): number of solutions up to ``limit``."""
    br, bc = _box(n)
    g = [list(puzzle[r * n : (r + 1) * n]) for r in range(n)]

    def ok(r, c, v):
        if v in g[r] or any(g[i][c] == v for i in range(n)):
            return False
        r0, c0 = r // br * br, c // bc * bc
        return all(g[i][j] != v for i in range(r0, r0 + br) for j in range(c0, c0 + bc))

    def rec(pos):
        while pos < n * n and g[pos // n][pos % n]:
            pos += 1
        if pos == n * n:
            return 1
        r, c = divmod(pos, n)
        tot = 0
        for v in range(1, n + 1):
            if ok(r, c, v):
                g[r][c] = v
                tot += rec(pos + 1)
                g[r][c] = 0
                if tot >= limit:
                    break
        return tot

    return rec(0)


def _valid_solution(s, n):
    br, bc = _box(n)
    G = np.asarray(s).reshape(n, n)
    want = set(range(1, n + 1))
    rows = all(set(G[r]) == want for r in range(n))
    cols = all(set(G[:, c]) == want for c in range(n))
    boxes = all(set(G[r : r + br, c : c + bc].ravel()) == want for r in range(0, n, br) for c in range(0, n, bc))
    return rows and cols and boxes


@pytest.mark.parametrize(
    "size,givens,n",
    [(4, (8, 10), 200), (4, (4, 6), 200), (9, (31, 42), 12), (9, (17, 34), 4), (6, (18, 22), 60), (6, (10, 14), 60)],
)
def test_unique_solution_and_given_counts(size, givens, n):
    P, S = sudoku.generate(n, size=size, givens=givens, seed=3, cache=False)
    assert P.dtype == np.int64 and S.dtype == np.int64 and P.shape == S.shape == (n, size * size)
    cnt = (P > 0).sum(1)
    assert cnt.min() >= givens[0] and cnt.max() <= givens[1]
    assert ((P == 0) | (P == S)).all() and S.min() >= 1 and S.max() <= size
    for p, s in zip(P, S):
        assert _valid_solution(s, size)
        assert _independent_count(list(p), size) == 1


def test_determinism_prefix_and_seed():
    a = sudoku.generate(20, size=4, givens=(5, 8), seed=7, cache=False)
    b = sudoku.generate(30, size=4, givens=(5, 8), seed=7, cache=False)
    c = sudoku.generate(20, size=4, givens=(5, 8), seed=8, cache=False)
    assert np.array_equal(a[0], b[0][:20]) and np.array_equal(a[1], b[1][:20])
    assert not np.array_equal(a[0], c[0])


def test_cache_roundtrip(tmp_path):
    a = sudoku.generate(10, size=4, seed=1, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")
    b = sudoku.generate(5, size=4, seed=1, cache_dir=str(tmp_path))
    assert np.array_equal(a[0][:5], b[0])
    c = sudoku.generate(15, size=4, seed=1, cache_dir=str(tmp_path))  # extends the cached prefix
    assert np.array_equal(c[0][:10], a[0]) and np.array_equal(c[0], sudoku.generate(15, size=4, seed=1, cache=False)[0])


def test_solver_helpers_and_errors():
    P, S = sudoku.generate(3, size=9, seed=0, cache=False)
    assert np.array_equal(sudoku.solve(P[0]), S[0])
    assert sudoku.count_solutions(np.zeros(16, np.int64)) == 2
    with pytest.raises(ValueError, match="size"):
        sudoku.generate(1, size=5)
    with pytest.raises(ValueError, match="givens"):
        sudoku.generate(1, size=4, givens=(10, 3))
    with pytest.raises(ValueError, match="puzzle"):
        sudoku.count_solutions(np.zeros(10))


def test_loaders(tmp_path):
    P, S = sudoku.generate(4, size=9, seed=2, cache=False)
    rrn = tmp_path / "test.csv"
    rrn.write_text("".join("".join(map(str, p)) + "," + "".join(map(str, s)) + "\n" for p, s in zip(P, S)))
    a = sudoku.load_csv(str(rrn))
    assert np.array_equal(a[0], P) and np.array_equal(a[1], S)
    kag = tmp_path / "kaggle.csv"
    kag.write_text(
        "quizzes,solutions\n"
        + "".join("".join(str(v) if v else "." for v in p) + "," + "".join(map(str, s)) + "\n" for p, s in zip(P, S))
    )
    assert np.array_equal(sudoku.load_csv(str(kag))[0], P)
    np.savez(tmp_path / "d.npz", puzzles=P, solutions=S)
    assert np.array_equal(sudoku.load_numpy(str(tmp_path / "d.npz"))[1], S)
    import torch

    eye = torch.eye(10)[:, 1:]  # digit 0 -> all-zero row (blank)
    torch.save(eye[torch.from_numpy(P)].reshape(4, 9, 9, 9), tmp_path / "features.pt")
    torch.save(eye[torch.from_numpy(S)].reshape(4, 9, 9, 9), tmp_path / "labels.pt")
    b = sudoku.load_satnet(str(tmp_path))
    assert np.array_equal(b[0], P) and np.array_equal(b[1], S)
    with pytest.raises(ValueError, match="path"):
        sudoku.load_csv(str(tmp_path / "missing.csv"))


def test_six_by_six_splits():
    """6x6 (2x3 boxes): ID and OOD splits by givens, their sizes, unique solutions (independent solver)."""
    sp = sudoku.splits(6, n_train=30, n_test=12, seed=5, cache=False)
    assert {k: v[0].shape for k, v in sp.items()} == {"train": (30, 36), "test_id": (12, 36), "test_ood": (12, 36)}
    for split, (lo, hi) in (
        ("train", sudoku.ID_GIVENS[6]),
        ("test_id", sudoku.ID_GIVENS[6]),
        ("test_ood", sudoku.OOD_GIVENS[6]),
    ):
        P, S = sp[split]
        cnt = (P > 0).sum(1)
        assert lo <= cnt.min() and cnt.max() <= hi, split
        assert all(_independent_count(list(p), 6) == 1 and _valid_solution(s, 6) for p, s in zip(P, S))
    assert sudoku.OOD_GIVENS[6][1] < sudoku.ID_GIVENS[6][0]  # the splits do not overlap in givens
    assert np.array_equal(sudoku.solve(sp["test_ood"][0][0]), sp["test_ood"][1][0])
    assert sudoku.count_solutions(np.zeros(36, np.int64)) == 2
    # 6x6 has ~2.8e7 solution grids: unlike 4x4 (288), a training set cannot hold them all
    assert len({tuple(s) for s in sp["train"][1]}) == 30
