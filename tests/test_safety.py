"""Nothing unsafe loaded, nothing wrong returned quietly, no finished work lost (issue 14).

- planted pickles (a checkpoint, a model file) do not run their payload;
- a resume is refused for every change of model class, hyperparameter, attribute or callable;
- qr(M, out=M) is orthonormal on every path;
- renorm_every cannot corrupt the lower exponents (a known spectrum whose gap breaks long intervals);
- write failures: found before the run, or after it without losing the results; corrupt checkpoints explained;
- every result file is strict JSON.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import pytest
import torch

import fastjac as fj
import fastjac.analysis.lyapunov as lyap
from fastjac.__main__ import main

F64 = torch.float64
SMALL = ["--tokens", "4", "--dim", "8", "--heads", "2", "--k", "3", "--steps", "6", "--burn-in", "1", "--quiet"]


class Payload:
    """Unpickling this runs ``open(marker, 'w').write(...)``: what a planted file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def _strict_json(text: str):
    def bad(token):
        raise AssertionError(f"not strict JSON: bare {token}")

    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------- planted pickles


def test_planted_checkpoint_does_not_run(tmp_path):
    marker, ckpt = tmp_path / "pwned", tmp_path / "run.ckpt"
    torch.save({"format": "fastjac.lyapunov_spectrum.v2", "fingerprint": "x", "state": Payload(marker)}, ckpt)
    m, X0 = fj.ItrSA(8, 2, dtype=F64), torch.randn(4, 8, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"checkpoint: .* is not a readable fastjac checkpoint .*nothing in it was "
        r"run.*--fresh",
    ):  # noqa
        fj.lyapunov_spectrum(m, X0, k=2, steps=2, checkpoint=str(ckpt), progress=False)
    assert not marker.exists()


def test_planted_model_file_does_not_run(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(ValueError, match=r"not a safetensors model file.*allow_pickle=True"):
        fj.load_model(str(path))
    assert main(["--model", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_pickled_model_needs_opt_in_and_warns(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(fj.ItrSA(8, 2), path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        fj.load_model(str(path))
    with pytest.warns(UserWarning, match="runs any code the file holds"):
        m = fj.load_model(str(path), allow_pickle=True)
    assert isinstance(m, fj.ItrSA)


def test_cli_model_file_round_trip(tmp_path):
    torch.manual_seed(3)
    model = fj.ItrSA(8, 2, norm="rms", dtype=F64)
    fj.save_model(model, str(tmp_path / "m.safetensors"))
    out = tmp_path / "o"
    argv = [
        "--model",
        str(tmp_path / "m.safetensors"),
        "--tokens",
        "4",
        "--k",
        "3",
        "--steps",
        "5",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    d = _strict_json((out / "lyapunov.json").read_text())
    assert "norm='rms'" in d["model"] and len(d["exponents"]) == 3


# ------------------------------------------------------------------------------------------- resume refusal

BASE = dict(dim=8, heads=2)
CHANGES = {
    "heads": dict(heads=4),
    "head_dim": dict(head_dim=2),
    "value_dim": dict(value_dim=2),
    "out_proj": dict(out_proj=False),
    "bias": dict(bias=True),
    "norm": dict(norm="rms"),
    "norm_group": dict(norm_group=4),
    "eps": dict(eps=1e-3),
    "eta": dict(eta=0.5),
    "beta": dict(beta=0.3),
    "causal": dict(causal=True),
    "dtype": dict(dtype=torch.float32),
}


def _model(**kw):
    torch.manual_seed(0)  # the same random weights whatever the hyperparameters (same raw bytes where shapes agree)
    cfg = dict(BASE, dtype=F64)
    cfg.update(kw)
    return fj.ItrSA(**cfg)


def _run(step, ckpt, X0=None, **kw):
    X0 = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(1)) if X0 is None else X0
    if isinstance(step, torch.nn.Module):
        X0 = X0.to(step.dtype)
    return fj.lyapunov_spectrum(step, X0, k=2, steps=3, checkpoint=str(ckpt), progress=False, **kw)


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_resume_refused_for_each_hyperparameter(tmp_path, what):
    ckpt = tmp_path / "run.ckpt"
    _run(_model(), ckpt)
    _run(_model(), ckpt)  # the same run resumes its finished checkpoint
    with pytest.raises(ValueError, match=r"checkpoint: .* other inputs or settings .*--fresh"):
        _run(_model(**CHANGES[what]), ckpt)


def test_resume_refused_for_changed_attributes_and_class(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    _run(_model(), ckpt)
    m = _model()
    m.beta = 0.7  # changed after construction: config() does not see it, the fingerprint does
    with pytest.raises(ValueError, match="other inputs or settings"):
        _run(m, ckpt)
    torch.manual_seed(0)
    a = fj.AKOrN(8, 2, osc_dim=8, dtype=F64)
    with pytest.raises(ValueError, match="other inputs or settings"):
        _run(a, ckpt)


def _scaled(a):
    return lambda x: torch.tanh(a * x)


def _mul(x, a):
    return torch.tanh(a * x)


W1 = torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(5)) / 4


def _closure_tensor(W):
    return lambda x: torch.tanh(x @ W)


CALLABLES = {
    "code": (lambda x: torch.tanh(2 * x), lambda x: 0.1 * x),
    "constant": (lambda x: torch.tanh(2 * x), lambda x: torch.tanh(3 * x)),
    "closure number": (_scaled(2.0), _scaled(2.5)),
    "closure tensor": (_closure_tensor(W1), _closure_tensor(W1 * 1.01)),
    "partial": (functools.partial(_mul, a=2.0), functools.partial(_mul, a=0.5)),
}


@pytest.mark.parametrize("what", sorted(CALLABLES))
def test_resume_refused_for_changed_callable(tmp_path, what):
    f, g = CALLABLES[what]
    ckpt = tmp_path / "run.ckpt"
    _run(f, ckpt)
    _run(f, ckpt)
    with pytest.raises(ValueError, match="other inputs or settings"):
        _run(g, ckpt)


def test_cli_resume_refused_for_changed_options(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(SMALL + ["--out", out]) == 0
    first = _strict_json(open(os.path.join(out, "lyapunov.json")).read())["exponents"]
    for extra in (["--norm", "rms"], ["--heads", "4"], ["--eta", "0.5"]):
        args = SMALL + ["--out", out] + extra
        if "--heads" in extra:
            args = [
                a
                for i, a in enumerate(args)
                if not (a == "--heads" and i < len(SMALL))
                and not (i > 0 and args[i - 1] == "--heads" and i < len(SMALL))
            ]
        assert main(args) == 2
        assert "--fresh" in capsys.readouterr().err
        assert main(args + ["--fresh"]) == 0  # --fresh starts over: another model, other numbers
        assert _strict_json(open(os.path.join(out, "lyapunov.json")).read())["exponents"] != first
        assert main(SMALL + ["--out", out, "--fresh"]) == 0


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncated"])
def test_corrupt_checkpoint_is_explained(tmp_path, content):
    ckpt = tmp_path / "run.ckpt"
    if content == "truncated":
        _run(_model(), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    else:
        ckpt.write_bytes(content)
    with pytest.raises(ValueError, match=r"checkpoint: .*(empty|corrupt).*delete .* to start over \(CLI: --fresh\)"):
        _run(_model(), ckpt)


# ------------------------------------------------------------------------------------------- qr(M, out=M)


def _qr_paths():
    paths = ["auto", "torch", "householder"]
    try:
        fj.ops.qr_backend(torch.randn(20, 3, dtype=F64), "triton") if hasattr(fj.ops, "qr_backend") else __import__(
            "fastjac.ops.qr", fromlist=["qr_backend"]
        ).qr_backend(torch.randn(20, 3, dtype=F64), "triton")
        paths.append("triton")
    except Exception:
        pass
    return paths


@pytest.mark.parametrize("backend", _qr_paths())
@pytest.mark.parametrize("shape", [(20, 3), (4, 20, 3), (2, 3, 30, 5)])
def test_qr_out_aliasing_m_is_orthonormal(backend, shape):
    M = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    ref_Q, ref_logd = fj.ops.qr(M.clone(), backend=backend)
    Q, logd = fj.ops.qr(M, out=M, backend=backend)
    eye = torch.eye(shape[-1], dtype=F64)
    assert Q.data_ptr() == M.data_ptr()
    assert float((Q.mT @ Q - eye).norm(dim=(-2, -1)).max()) < 1e-12
    torch.testing.assert_close(Q, ref_Q, rtol=0, atol=1e-12)
    torch.testing.assert_close(logd, ref_logd, rtol=0, atol=1e-12)


def test_qr_out_aliasing_with_fallback_and_strided_view():
    base = torch.randn(40, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    M = base[::2]  # a strided view; the last column depends on the others: Householder fallback
    M[:, 7] = M[:, 0] + M[:, 1]
    Q, logd = fj.ops.qr(M, out=M)
    assert float((Q[:, :7].mT @ Q[:, :7] - torch.eye(7, dtype=F64)).norm()) < 1e-12
    assert logd[7] < -20


# ------------------------------------------------------------------------------------------- renorm_every


def _linear(lams, n, dtype, seed=4):
    """x -> A x with A = U diag(exp(lams)) U^T: its Lyapunov exponents are exactly lams (then -inf-like rest)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    d = torch.full((n,), -8.0, dtype=F64)
    d[: len(lams)] = torch.tensor(lams, dtype=F64)
    A = (U * d.exp()) @ U.T

    def step(x):
        return (x.reshape(-1) @ A.to(x.dtype).T).reshape(x.shape)

    return step


def test_renorm_every_with_a_spectral_gap_is_redone_not_corrupted():
    lams = [0.0, -0.5, -1.0, -1.5]  # gap 1.5 to the 4th: in float32 the 4th column is lost after ~5 steps
    f = _linear(lams, 8, torch.float32)
    X0 = torch.randn(2, 4, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    kw = dict(k=4, steps=200, progress=False)
    every = fj.lyapunov_spectrum(f, X0, renorm_every=1, **kw)
    with pytest.warns(RuntimeWarning, match=r"renorm_every=50 lets the tangents collapse.*re-orthonormalising every"):
        long = fj.lyapunov_spectrum(f, X0, renorm_every=50, **kw)
    used = long.settings["renorm_every_used"]
    assert 1 <= used <= 6  # sqrt(eps32) = 3.5e-4 = exp(-7.97): m * 1.5 must stay under ~8
    torch.testing.assert_close(long.exponents, every.exponents, rtol=0, atol=2e-4)
    torch.testing.assert_close(long.exponents, torch.tensor(lams, dtype=F64), rtol=0, atol=0.02)
    ok = fj.lyapunov_spectrum(f, X0, renorm_every=4, **kw)  # short enough: kept, no warning
    assert ok.settings["renorm_every_used"] == 4
    torch.testing.assert_close(ok.exponents, every.exponents, rtol=0, atol=2e-4)


def test_renorm_every_large_interval_in_float64_keeps_full_range():
    # strongly contracting: without per-step rescaling the tangents would underflow within an interval
    f = _linear([-3.0, -3.2, -3.4], 6, F64)
    X0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = fj.lyapunov_spectrum(f, X0, k=3, steps=300, renorm_every=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = fj.lyapunov_spectrum(f, X0, k=3, steps=300, renorm_every=30, progress=False)
    assert b.settings["renorm_every_used"] == 30
    torch.testing.assert_close(b.exponents, a.exponents, rtol=0, atol=1e-9)


def test_resume_with_redone_intervals_is_bit_for_bit(tmp_path, monkeypatch):
    f = _linear([0.0, -0.5, -1.0, -1.5], 8, torch.float32)
    X0 = torch.randn(2, 4, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    kw = dict(k=4, steps=60, renorm_every=40, progress=False)
    with pytest.warns(RuntimeWarning):
        ref = fj.lyapunov_spectrum(f, X0, **kw)
    ckpt = str(tmp_path / "r.ckpt")
    real, calls = lyap._lin, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 45:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lyap, "_lin", flaky)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fj.lyapunov_spectrum(f, X0, checkpoint=ckpt, checkpoint_every=7, **kw)
    monkeypatch.setattr(lyap, "_lin", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fj.lyapunov_spectrum(f, X0, checkpoint=ckpt, checkpoint_every=7, **kw)
    assert torch.equal(res.exponents, ref.exponents) and torch.equal(res.history, ref.history)


# ------------------------------------------------------------------------------------------- divergence


def test_diverging_run_warns():
    f = _linear([0.7], 4, F64)
    with pytest.warns(RuntimeWarning, match="the trajectory diverges"):
        res = fj.lyapunov_spectrum(f, torch.ones(1, 4, dtype=F64), k=1, steps=30, progress=False)
    assert abs(res.max.item() - 0.7) < 0.1  # the exponent is still the growth rate (transient ~1/steps)


def test_cli_diverging_norm_none_fails_early_with_a_message(tmp_path, capsys):
    rc = main(SMALL + ["--norm", "none", "--eta", "40", "--steps", "3000", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "X0: the trajectory overflowed at step" in err and "norm='none'" in err


# ------------------------------------------------------------------------------------------- write failures


def test_unwritable_out_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    called = []
    monkeypatch.setattr(lyap, "lyapunov_spectrum", lambda *a, **k: called.append(1))
    assert main(SMALL + ["--out", str(tmp_path / "file" / "sub")]) == 2
    assert "--out: cannot write to" in capsys.readouterr().err and not called


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores read-only permissions")
def test_read_only_out_is_refused_before_the_run(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(SMALL + ["--out", str(ro)]) == 2
        assert "--out: cannot write to" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_failed_writes_after_the_run_lose_nothing(tmp_path, capsys, monkeypatch):
    out, fallback = tmp_path / "o", tmp_path / "fallback"
    fallback.mkdir()
    import builtins
    import tempfile

    real_open = builtins.open

    def failing_open(path, mode="r", *a, **k):
        # the JSON is written atomically (lyapunov.json.tmp, then renamed): a full disk fails the temporary file
        if "w" in mode and str(path).endswith(("lyapunov.json", "lyapunov.json.tmp", "lyapunov.png")):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    real_save = lyap._save_checkpoint

    def failing_save(path, state):
        if state["state"]["t"] >= 7:  # the final save fails (the periodic ones before did not)
            raise OSError(28, "No space left on device")
        return real_save(path, state)

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(lyap, "_save_checkpoint", failing_save)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(fallback))
    with pytest.warns(RuntimeWarning, match="could not write the checkpoint"):
        rc = main(SMALL + ["--out", str(out), "--checkpoint-every", "2"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "lambda_max =" in captured.out and "could not write" in captured.err
    files = list(fallback.glob("fastjac_lyapunov_*.json"))
    assert len(files) == 1
    d = _strict_json(files[0].read_text())
    assert len(d["exponents"]) == 3 and d["steps"] == 6


def test_checkpoint_write_failure_mid_run_returns_the_result(tmp_path, monkeypatch):
    def failing(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lyap, "_save_checkpoint", failing)
    with pytest.warns(RuntimeWarning, match="could not write the checkpoint"):
        res = _run(_model(), tmp_path / "run.ckpt", checkpoint_every=1)
    assert res.exponents.shape == (2,)


# ------------------------------------------------------------------------------------------- strict JSON


def test_result_files_are_strict_json(tmp_path):
    m = fj.ItrSA(8, 2, dtype=F64)  # normalised: 4 trivial -inf exponents with k = all 32
    X0 = torch.randn(4, 8, dtype=F64)
    res = fj.lyapunov_spectrum(m, X0, steps=4, progress=False)
    bad = X0.clone()
    bad[0, 0] = float("nan")
    with fj.config.settings(check_finite=False):  # NaN all the way through: still valid JSON
        res_nan = fj.lyapunov_spectrum(m, bad, k=2, steps=2, progress=False)
    ft = fj.finite_time_lyapunov(m, X0, horizon=3)
    for i, r in enumerate((res, res_nan, ft)):
        p = tmp_path / f"r{i}.json"
        r.save_json(str(p))
        d = _strict_json(p.read_text())
        assert d["units"] == "nats per step"
    assert _strict_json((tmp_path / "r0.json").read_text())["exponents"][-1] is None  # -inf -> null
    assert _strict_json((tmp_path / "r1.json").read_text())["max"] is None  # NaN -> null
    out = tmp_path / "cli"
    assert main(SMALL + ["--out", str(out)]) == 0
    _strict_json((out / "lyapunov.json").read_text())


# ------------------------------------------------------------------------------------------- the seam


def test_jacobian_carries_no_graph_unless_asked():
    m = fj.ItrSA(8, 2, dtype=F64)
    X = torch.randn(4, 8, dtype=F64, requires_grad=True)
    J = fj.jacobian(m, X)
    assert not J.requires_grad and J.grad_fn is None
    Jg = fj.jacobian(m, X, create_graph=True)
    assert Jg.requires_grad
    torch.testing.assert_close(J, Jg.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", ["autograd", "torch"])
def test_zero_tangents(backend):
    m = fj.ItrSA(8, 2, dtype=F64)
    X = torch.randn(4, 8, dtype=F64)
    step = m if backend == "torch" else (lambda x: torch.tanh(x))
    Y, JT = fj.jvp(step, X, torch.empty(0, 4, 8, dtype=F64), backend=backend)
    assert JT.shape == (0, 4, 8)


def test_fingerprint_sees_shapes_not_only_bytes():
    X0 = torch.zeros(4, 8, dtype=F64)
    a = lyap.fingerprint(lambda x: x, X0, None, {})
    b = lyap.fingerprint(lambda x: x, X0.reshape(8, 4), None, {})
    assert a != b
    W = torch.zeros(4, 4, dtype=F64)
    assert lyap.fingerprint(_closure_tensor(W), X0, None, {}) != lyap.fingerprint(
        _closure_tensor(W.reshape(2, 8)), X0, None, {}
    )
    assert lyap.fingerprint(_scaled(2.0), X0, None, {}) == lyap.fingerprint(_scaled(2.0), X0, None, {})
