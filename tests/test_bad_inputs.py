"""Table of bad and edge inputs: each raises fastjac's own error, of the right type, naming the argument.

Every row is (id, exception type, a regex the message must match, a thunk). The cases are those a new user hits
(issue 14) plus the long-standing ones of tests/test_errors.py.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import warnings

import pytest
import torch

import fastjac as fj
from fastjac._checks import NonFiniteError

F64 = torch.float64


def _m(**kw):
    torch.manual_seed(0)
    return fj.ItrSA(8, 2, dtype=F64, **kw)


def _X(S=5, B=None):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*((B,) if B else ()), S, 8, generator=g, dtype=F64)


def _poisoned(name, value, cls=fj.ItrSA, **kw):
    m = cls(8, 2, dtype=F64, **kw)
    with torch.no_grad():
        getattr(m, name).view(-1)[0] = value
    return m


def _set(m, **attrs):
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _lyap(step=None, X=None, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("k", 2)
    return fj.lyapunov_spectrum(step if step is not None else _m(), X if X is not None else _X(), progress=False, **kw)


class Counter:
    """A callable step that counts its calls (to show an error came before any compute)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return torch.tanh(x)


def _qr_backend_before_burn_in():
    f = Counter()
    try:
        fj.lyapunov_spectrum(f, _X(), k=2, steps=3, burn_in=50, qr_backend="bogus", progress=False)
    finally:
        assert f.calls == 0, "qr_backend was checked only after the step ran"


def _dense_limit_attr(value):
    old = fj.config.dense_limit_gb
    fj.config.dense_limit_gb = value
    try:
        fj.jacobian(_m(), _X())
    finally:
        fj.config.dense_limit_gb = old


nan, inf = float("nan"), float("inf")

CASES = [
    # ---- states, inputs, tangents (existing)
    (
        "X 1-d",
        ValueError,
        r"X: expected shape \[S, D\] or \[B, S, D\]",
        lambda: fj.jvp(_m(), torch.randn(8, dtype=F64), torch.randn(8, dtype=F64)),
    ),
    (
        "X wrong dim",
        ValueError,
        r"X: last dimension 7 does not match the model's dim=8",
        lambda: fj.jacobian(_m(), torch.randn(5, 7, dtype=F64)),
    ),
    ("X list", TypeError, r"X: expected a torch.Tensor, got list", lambda: fj.jacobian(_m(), [[1.0] * 8])),
    (
        "X int",
        TypeError,
        r"X: expected a floating-point tensor",
        lambda: fj.jacobian(_m(), torch.ones(5, 8, dtype=torch.long)),
    ),
    (
        "X dtype",
        TypeError,
        r"X: dtype torch.float32 does not match the model's torch.float64",
        lambda: fj.jvp(_m(), _X().float(), _X().float()),
    ),
    (
        "X NaN",
        ValueError,
        r"X: contains NaN or inf",
        lambda: fj.jvp(_m(), _X().index_fill(0, torch.tensor([1]), nan), _X()),
    ),
    (
        "T shape",
        ValueError,
        r"T: expected shape \(5, 8\) or \(k,\) \+ \(5, 8\)",
        lambda: fj.jvp(_m(), _X(), torch.randn(4, 8, dtype=F64)),
    ),
    ("T inf", ValueError, r"T: contains NaN or inf", lambda: fj.jvp(_m(), _X(), _X() * inf)),
    (
        "C shape",
        ValueError,
        r"C: expected shape \(5, 8\)",
        lambda: fj.jvp(_m(), _X(), _X(), C=torch.randn(4, 8, dtype=F64)),
    ),
    ("C dtype", TypeError, r"C: dtype torch.float32", lambda: fj.vjp(_m(), _X(), C=_X().float())),
    ("step not callable", TypeError, r"step: expected a fastjac model or a callable", lambda: fj.jvp(3, _X(), _X())),
    (
        "step changes shape",
        ValueError,
        r"step: a step must map X to X's shape",
        lambda: fj.jvp(lambda x: x[..., :6], _X(), _X()),
    ),
    (
        "backend name",
        ValueError,
        r"backend: expected one of .*got 'fast'",
        lambda: fj.jvp(_m(), _X(), _X(), backend="fast"),
    ),
    # ---- new: devices, dtypes of callables, overflow
    (
        "X meta vs model cpu",
        ValueError,
        r"X: device meta does not match the model's cpu",
        lambda: fj.jvp(_m(), torch.empty(5, 8, device="meta", dtype=F64), _X()),
    ),
    (
        "X meta, callable",
        ValueError,
        r"X: is a 'meta' tensor",
        lambda: fj.jvp(torch.tanh, torch.empty(5, 8, device="meta"), torch.empty(5, 8, device="meta")),
    ),
    (
        "callable returns float32",
        TypeError,
        r"step: returned torch.float32 for a torch.float64 X",
        lambda: fj.jvp(lambda x: x.float(), _X(), _X()),
    ),
    (
        "finite X overflows",
        NonFiniteError,
        r"X: step\(X\) has inf/NaN entries although X, C and the weights are finite",
        lambda: fj.jvp(_m(), _X() * 1e300, _X()),
    ),
    (
        "X0 overflows in lyapunov",
        NonFiniteError,
        r"X0: the trajectory overflowed at step 1",
        lambda: _lyap(fj.ItrSA(8, 2, norm="none", dtype=F64), _X() * 1e200, steps=5),
    ),
    (
        "trajectory overflows later",
        NonFiniteError,
        r"X0: the trajectory overflowed at step \d+ of 60 .*nothing in the step bounds",
        lambda: _lyap(lambda x: 1e12 * x, _X(), steps=60),
    ),
    # ---- weights and hyperparameters (checked once per call, under check_finite)
    ("eta NaN", ValueError, r"ItrSA.eta: contains NaN or inf", lambda: fj.jvp(_poisoned("eta", nan), _X(), _X())),
    ("wq inf", ValueError, r"ItrSA.wq: contains NaN or inf", lambda: fj.jacobian(_poisoned("wq", inf), _X())),
    ("gamma NaN", ValueError, r"ItrSA.gamma: contains NaN or inf", lambda: fj.vjp(_poisoned("gamma", nan), _X())),
    (
        "omega NaN",
        ValueError,
        r"AKOrN.omega: contains NaN or inf",
        lambda: fj.jvp(_poisoned("omega", nan, fj.AKOrN, osc_dim=4), _X(), _X()),
    ),
    (
        "beta NaN attr",
        ValueError,
        r"ItrSA.beta: expected a finite number",
        lambda: fj.jvp(_set(_m(), beta=nan), _X(), _X()),
    ),
    ("eta NaN in lyapunov", ValueError, r"ItrSA.eta: contains NaN", lambda: _lyap(_poisoned("eta", nan))),
    ("eta NaN in eigvals", ValueError, r"ItrSA.eta: contains NaN", lambda: fj.eigvals(_poisoned("eta", nan), _X())),
    # ---- constructors
    (
        "dtype int64",
        TypeError,
        r"dtype: expected a real floating-point dtype",
        lambda: fj.ItrSA(8, 2, dtype=torch.int64),
    ),
    (
        "dtype complex",
        TypeError,
        r"dtype: expected a real floating-point dtype",
        lambda: fj.ItrSA(8, 2, dtype=torch.complex64),
    ),
    ("dtype str", TypeError, r"dtype: expected a torch.dtype", lambda: fj.AKOrN(8, 2, dtype="float32")),
    ("eta nan ctor", ValueError, r"eta: expected a finite number", lambda: fj.ItrSA(8, 2, eta=nan)),
    ("eta str ctor", TypeError, r"eta: expected a number", lambda: fj.ItrSA(8, 2, eta="1")),
    ("beta inf ctor", ValueError, r"beta: expected a finite number", lambda: fj.ItrSA(8, 2, beta=inf)),
    ("eps negative", ValueError, r"eps: expected a number >= 0", lambda: fj.ItrSA(8, 2, eps=-1e-6)),
    ("eps nan", ValueError, r"eps: expected a finite number", lambda: fj.ItrSA(8, 2, eps=nan)),
    ("omega_std nan", ValueError, r"omega_std: expected a finite number", lambda: fj.AKOrN(8, 2, omega_std=nan)),
    ("causal str", TypeError, r"causal: expected True or False", lambda: fj.ItrSA(8, 2, causal="yes")),
    ("device bogus", ValueError, r"device: not a torch device", lambda: fj.ItrSA(8, 2, device="gpu7")),
    ("norm_group", ValueError, r"norm_group: must divide dim=8, got 3", lambda: fj.ItrSA(8, 2, norm_group=3)),
    ("osc_dim", ValueError, r"osc_dim: must divide dim=8, got 3", lambda: fj.AKOrN(8, 2, osc_dim=3)),
    ("norm name", ValueError, r"norm: expected one of", lambda: fj.ItrSA(8, 2, norm="batch")),
    ("heads 0", ValueError, r"heads: expected an int >= 1, got 0", lambda: fj.ItrSA(8, 0)),
    ("dim float", TypeError, r"dim: expected an int, got float", lambda: fj.ItrSA(8.0, 2)),
    # ---- lyapunov arguments
    ("seed str", TypeError, r"seed: expected an int or a torch.Generator, got str", lambda: _lyap(seed="a")),
    ("seed float", TypeError, r"seed: expected an int or a torch.Generator, got float", lambda: _lyap(seed=1.5)),
    ("seed negative", ValueError, r"seed: expected an int >= 0", lambda: _lyap(seed=-1)),
    ("qr_backend bogus (before burn-in)", ValueError, r"qr_backend: expected one of", _qr_backend_before_burn_in),
    ("k 0", ValueError, r"k: expected an int >= 1, got 0", lambda: _lyap(k=0)),
    ("k too large", ValueError, r"k: expected at most 40", lambda: _lyap(k=41)),
    ("renorm_every 0", ValueError, r"renorm_every: expected an int >= 1", lambda: _lyap(renorm_every=0)),
    ("steps float", TypeError, r"steps: expected an int", lambda: _lyap(steps=2.0)),
    ("trivial_below str", TypeError, r"trivial_below: expected a number or None", lambda: _lyap(trivial_below="-9")),
    ("trivial_below nan", ValueError, r"trivial_below: expected a finite number", lambda: _lyap(trivial_below=nan)),
    ("checkpoint int", TypeError, r"checkpoint: expected a file path or None", lambda: _lyap(checkpoint=3)),
    (
        "checkpoint missing folder",
        ValueError,
        r"checkpoint: the folder .* does not exist",
        lambda: _lyap(checkpoint="/nonexistent_fj_dir/x.ckpt"),
    ),
    ("horizon float", TypeError, r"horizon: expected an int", lambda: fj.finite_time_lyapunov(_m(), _X(), horizon=2.5)),
    # ---- dense-size guard and settings
    ("max_gb nan", ValueError, r"max_gb: expected a finite number", lambda: fj.jacobian(_m(), _X(), max_gb=nan)),
    ("max_gb str", TypeError, r"max_gb: expected a number, got str", lambda: fj.jacobian(_m(), _X(), max_gb="1")),
    ("max_gb negative", ValueError, r"max_gb: expected a positive number", lambda: fj.jacobian(_m(), _X(), max_gb=-1)),
    (
        "max_gb over",
        ValueError,
        r"dense Jacobian would be 1 x \[4000, 4000\] torch.float64 = 0.13 GB, over the limit of 0.01 GB",
        lambda: fj.jacobian(_m(), torch.randn(500, 8, dtype=F64), max_gb=0.01),
    ),
    (
        "lin.dense max_gb nan",
        ValueError,
        r"max_gb: expected a finite number",
        lambda: fj.linearization(_m(), _X()).dense(max_gb=nan),
    ),
    (
        "dense_limit_gb attr nan",
        ValueError,
        r"fastjac.config.dense_limit_gb: expected a finite number",
        lambda: _dense_limit_attr(nan),
    ),
    (
        "dense_limit_gb attr str",
        TypeError,
        r"fastjac.config.dense_limit_gb: expected a number",
        lambda: _dense_limit_attr("4"),
    ),
    (
        "set_dense_limit_gb nan",
        ValueError,
        r"gb: expected a positive number",
        lambda: fj.config.set_dense_limit_gb(nan),
    ),
    (
        "set_dense_limit_gb str",
        TypeError,
        r"gb: expected a positive number of GB, got str",
        lambda: fj.config.set_dense_limit_gb("4"),
    ),
    (
        "settings dense_limit_gb nan",
        ValueError,
        r"dense_limit_gb: expected a positive number",
        lambda: fj.config.settings(dense_limit_gb=nan).__enter__(),
    ),
    (
        "settings check_finite str",
        TypeError,
        r"check_finite: expected True or False",
        lambda: fj.config.settings(check_finite="no").__enter__(),
    ),
    (
        "settings matmul_precision",
        ValueError,
        r"matmul_precision: expected one of",
        lambda: fj.config.settings(matmul_precision="fp8").__enter__(),
    ),
    ("set_matmul_precision", ValueError, r"precision: expected one of", lambda: fj.config.set_matmul_precision("fp8")),
    ("settings unknown", TypeError, r"settings: unknown setting", lambda: fj.config.settings(fast=True).__enter__()),
    (
        "eigvals dense too big",
        ValueError,
        r"k: all S\*D = 10240 eigenvalues need a dense eig .* about \d+ min",
        lambda: fj.eigvals(fj.ItrSA(64, 2), torch.randn(160, 64)),
    ),
    # ---- qr
    (
        "qr out shape",
        ValueError,
        r"out: expected a torch.float64 tensor of shape \(20, 3\)",
        lambda: fj.ops.qr(torch.randn(20, 3, dtype=F64), out=torch.empty(20, 4, dtype=F64)),
    ),
    ("qr wide", ValueError, r"M: expected a tall-skinny", lambda: fj.ops.qr(torch.randn(3, 20))),
    ("qr backend", ValueError, r"backend: expected one of", lambda: fj.ops.qr(torch.randn(20, 3), backend="bogus")),
    # ---- model files
    (
        "load_model missing",
        ValueError,
        r"path: no such file",
        lambda: fj.load_model("/nonexistent_fj_model.safetensors"),
    ),
    (
        "save_model into a missing folder",
        ValueError,
        r"path: the folder .* does not exist",
        lambda: fj.save_model(_m(), "/nonexistent_fj_dir/m.safetensors"),
    ),
    (
        "save_model metadata not str",
        TypeError,
        r"metadata: expected a dict of str -> str",
        lambda: fj.save_model(_m(), "/tmp/m.safetensors", metadata={"a": 1}),
    ),
    (
        "check_model_size over the limit",
        ValueError,
        r"dim: .*dim=30000, heads=4.*28.80 GB.*over the limit of 4 GB",
        lambda: fj.models.check_model_size(30000, 4),
    ),
    # ---- training and data
    (
        "generate givens str",
        ValueError,
        r"givens: expected a pair of ints \(lo, hi\), got '59'",
        lambda: importlib.import_module("fastjac.data.sudoku").generate(2, size=4, givens="59", cache=False),
    ),
    (
        "generate givens float",
        ValueError,
        r"givens: expected a pair of ints",
        lambda: importlib.import_module("fastjac.data.sudoku").generate(2, size=4, givens=(6.9, 7.9), cache=False),
    ),
    (
        "generate givens triple",
        ValueError,
        r"givens: expected a pair of ints",
        lambda: importlib.import_module("fastjac.data.sudoku").generate(2, size=4, givens=(6, 7, 1), cache=False),
    ),
    (
        "jacobian_frobenius reduction 2-D",
        ValueError,
        r"reduction: expected 'mean', 'sum' or 'none', got 'bogus'",
        lambda: importlib.import_module("fastjac.train.regularizers").jacobian_frobenius(_m(), _X(), reduction="bogus"),
    ),
    (
        "lyapunov_penalty reduction 2-D",
        ValueError,
        r"reduction: expected 'mean', 'sum' or 'none'",
        lambda: importlib.import_module("fastjac.train.regularizers").lyapunov_penalty(
            _m(), _X(), horizon=2, k=2, reduction="bogus"
        ),
    ),
    (
        "TrainConfig log_every 0",
        ValueError,
        r"log_every: expected an int >= 1, got 0",
        lambda: importlib.import_module("fastjac.train.loop").TrainConfig(log_every=0).validate(),
    ),
    (
        "TrainConfig lr inf",
        ValueError,
        r"lr: expected a finite number > 0, got inf",
        lambda: importlib.import_module("fastjac.train.loop").TrainConfig(lr=math.inf).validate(),
    ),
]


@pytest.mark.parametrize("name,exc,pattern,thunk", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, exc, pattern, thunk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(exc, match=pattern):
            thunk()


# ---- the CLI: argparse errors (exit 2 with the option named) and fastjac errors (return 2, message on stderr)

CLI_CASES = [
    ("--tokens -3", ["--tokens", "-3"], r"argument --tokens: expected an int >= 1, got -3"),
    ("--k 0", ["--k", "0"], r"argument --k: expected an int >= 1, got 0"),
    ("--steps abc", ["--steps", "abc"], r"argument --steps: expected an int, got 'abc'"),
    ("--eta nan", ["--eta", "nan"], r"argument --eta: expected a finite number, got 'nan'"),
    (
        "--dim beside --model",
        ["--model", "m.safetensors", "--dim", "16"],
        r"--model: --dim would be ignored beside --model",
    ),
    (
        "--norm and --heads beside --model",
        ["--model", "m.safetensors", "--norm", "rms", "--heads", "2"],
        r"--model: --heads, --norm would be ignored",
    ),
    ("--model missing", ["--model", "/nonexistent_fj.safetensors"], r"--model: no such file"),
    ("--out not writable", ["--out", "OUTFILE/sub"], r"--out: cannot write to"),
]


@pytest.mark.parametrize("name,argv,pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli(name, argv, pattern, tmp_path, capsys, monkeypatch):
    import re

    from fastjac.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "OUTFILE").write_text("a file, not a folder")
    fj.save_model(fj.ItrSA(8, 2), str(tmp_path / "m.safetensors"))
    argv = argv + ["--quiet", "--tokens", "4", "--k", "2", "--steps", "2"] if "--tokens" not in argv else argv
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and re.search(pattern, err), err


def test_bad_environment_does_not_break_import():
    env = dict(__import__("os").environ, FASTJAC_DENSE_LIMIT_GB="abc", FASTJAC_MATMUL_PRECISION="fp8")
    code = "import fastjac as fj; print(fj.config.dense_limit_gb, fj.config.matmul_precision)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4.0", "ieee"]
    assert "ignoring FASTJAC_DENSE_LIMIT_GB='abc'" in r.stderr and "ignoring FASTJAC_MATMUL_PRECISION='fp8'" in r.stderr


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "0", "abc"])
def test_bad_dense_limit_env_keeps_the_default(raw, monkeypatch):
    from fastjac import config

    monkeypatch.setenv("FASTJAC_DENSE_LIMIT_GB", raw)
    try:
        with pytest.warns(RuntimeWarning, match="ignoring FASTJAC_DENSE_LIMIT_GB"):
            importlib.reload(config)
        assert config.dense_limit_gb == 4.0 and math.isfinite(config.dense_limit_gb)
    finally:
        monkeypatch.delenv("FASTJAC_DENSE_LIMIT_GB")
        importlib.reload(config)
    monkeypatch.setenv("FASTJAC_DENSE_LIMIT_GB", "0.5")
    try:
        importlib.reload(config)
        assert config.dense_limit_gb == 0.5
    finally:
        monkeypatch.delenv("FASTJAC_DENSE_LIMIT_GB")
        importlib.reload(config)
