"""ruff lint and format check over the repository (the rule set and its reasons: pyproject.toml [tool.ruff]).

ruff is pinned in the test extra: another version may format differently, which is not a defect of the code."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed: pip install -e '.[test]' installs it (the lint check must not skip)")
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    r = _ruff("check", "--output-format", "concise", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_check_passes():
    r = _ruff("format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr
