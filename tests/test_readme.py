"""Every ```python block of README.md runs, in order, in a fresh folder: the README stays true.

The blocks build on each other (Quick start defines model, X, C), so they share one namespace. The blocks up to the
one that checkpoints are then run a second time in the same folder: the second run meets the checkpoint of the
first and must resume it (a README snippet that only works once is a broken snippet).
"""

from __future__ import annotations

import os
import re
import warnings

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


def test_readme_blocks_run_and_rerun(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    last_ckpt = max(i for i, b in enumerate(blocks) if "checkpoint=" in b)
    results = []
    for run in range(2):
        ns = {"__name__": f"readme_run_{run}"}
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the README must not use deprecated spellings
            for i, src in enumerate(blocks if run == 0 else blocks[: last_ckpt + 1]):
                try:
                    exec(compile(src, f"README.md python block {i + 1}", "exec"), ns)
                except Exception as e:  # pragma: no cover - the message says which block
                    raise AssertionError(
                        f"README.md python block {i + 1} (run {run + 1}) failed: {type(e).__name__}: {e}"
                    ) from e
        results.append(ns["res"].exponents.clone())
    assert (tmp_path / "run.ckpt").exists() and (tmp_path / "lyap.json").exists()
    assert (tmp_path / "lyap.png").stat().st_size > 5000
    assert bool((results[0] == results[1]).all())  # the re-run resumed its finished checkpoint
