"""Lyapunov exponents on systems with known exponents, fast path vs callable path, trivial exponents, resume.

Tolerances are tied to the number of steps: for a linear map the QR estimate after n steps is off by
O(log(cond of the eigenbasis) / n); for a chaotic map the finite-time estimate fluctuates like O(1/sqrt(n)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from oracle import oracle_jacobian, randomize_

import fastjac as fj
import fastjac.analysis.lyapunov as lyap

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    # inputs drawn from torch's global RNG must not depend on what earlier tests (hypothesis ones) drew
    torch.manual_seed(0)


def _linear_step(mu, seed=0):
    """x -> M x with M = P diag(mu) P^-1 (real mu), acting on X [2, 3] through its flattening."""
    g = torch.Generator().manual_seed(seed)
    P = torch.eye(len(mu), dtype=F64) + 0.3 * torch.randn(len(mu), len(mu), generator=g, dtype=F64)
    M = P @ torch.diag(torch.tensor(mu, dtype=F64)) @ torch.linalg.inv(P)
    return lambda X: (M @ X.reshape(-1)).reshape(X.shape)


def test_linear_map_with_prescribed_spectrum():
    mu = [1.5, -0.9, 0.7, -0.5, 0.25, 0.1]
    steps = 250
    res = fj.lyapunov_spectrum(_linear_step(mu), torch.randn(2, 3, dtype=F64), steps=steps, progress=False)
    expected = sorted((math.log(abs(m)) for m in mu), reverse=True)
    torch.testing.assert_close(res.exponents, torch.tensor(expected, dtype=F64), rtol=0, atol=10 / steps)
    assert not res.trivial.any() and res.history.shape == (steps, 6)
    # the sum of all exponents is log|det| exactly, whatever the convergence of the individual ones
    assert abs(res.exponents.sum().item() - sum(expected)) < 1e-9


def test_itrsa_uniform_attention_is_affine():
    # beta = 0 and no normalisation: A_ij = 1/S, MSA(X)_i = M xbar with M = sum_h (Wv_h Wo_h)^T, so the step is
    # affine; its exponents are log|1 + eta mu| over the eigenvalues mu of M (the mean mode) and 0 for the rest
    S, D, eta = 5, 6, 0.3
    m = fj.ItrSA(D, 2, norm="none", beta=0.0, eta=eta, dtype=F64)
    randomize_(m, seed=3)
    with torch.no_grad():
        m.eta.fill_(eta)
    M = sum((m.wv[h] @ m.wo[h]).T for h in range(2))
    mean_mode = [math.log(abs(1 + eta * z)) for z in torch.linalg.eigvals(M).tolist()]
    expected = sorted(mean_mode + [0.0] * ((S - 1) * D), reverse=True)
    steps = 300
    res = fj.lyapunov_spectrum(
        m, torch.randn(S, D, dtype=F64), C=torch.randn(S, D, dtype=F64), steps=steps, progress=False
    )
    torch.testing.assert_close(res.exponents, torch.tensor(expected, dtype=F64), rtol=0, atol=10 / steps)


def test_henon_map_through_the_callable_path():
    a, b = 1.4, 0.3

    def henon(X):  # X [1, 2] = (x, y)
        x, y = X[..., 0], X[..., 1]
        return torch.stack([1 - a * x * x + y, b * x], -1)

    steps = 1000
    res = fj.lyapunov_spectrum(henon, torch.tensor([[0.1, 0.1]], dtype=F64), steps=steps, burn_in=100, progress=False)
    assert res.settings["backend"] == "auto"
    tol = 1.5 / math.sqrt(steps)  # finite-time fluctuation of a chaotic orbit
    assert abs(res.exponents[0].item() - 0.4196) < tol
    assert abs(res.exponents[1].item() - (-1.6236)) < tol
    assert abs(res.exponents.sum().item() - math.log(b)) < 1e-9  # |det J| = b exactly


@pytest.mark.parametrize("kw", [dict(norm="l2"), dict(norm="layer", norm_group=4, causal=True, bias=True)])
def test_fast_path_equals_callable_path(kw):
    m = randomize_(fj.ItrSA(12, 3, dtype=F64, **kw), seed=1)
    X0, C = torch.randn(2, 7, 12, dtype=F64), torch.randn(7, 12, dtype=F64)
    common = dict(C=C, k=6, steps=25, burn_in=3, progress=False)
    fast = fj.lyapunov_spectrum(m, X0, backend="torch", **common)
    ref = fj.lyapunov_spectrum(lambda X, C: m(X, C), X0, **common)  # a plain callable: torch.func
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.history, ref.history, rtol=0, atol=1e-10)


def test_akorn_fast_path_equals_autograd_backend():
    m = randomize_(fj.AKOrN(12, 2, osc_dim=3, dtype=F64), seed=2)
    X0 = m.project(torch.randn(5, 12, dtype=F64))
    common = dict(k=5, steps=20, burn_in=2, progress=False)
    fast = fj.lyapunov_spectrum(m, X0, **common)
    ref = fj.lyapunov_spectrum(m, X0, backend="autograd", **common)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm,group,per_group", [("l2", 12, 1), ("rms", 4, 1), ("layer", 6, 2), ("none", 12, 0)])
def test_trivial_exponents_are_minus_inf_and_masked(norm, group, per_group):
    S, D = 4, 12
    m = randomize_(fj.ItrSA(D, 2, norm=norm, norm_group=group, dtype=F64), seed=0)
    res = fj.lyapunov_spectrum(m, torch.randn(S, D, dtype=F64), steps=30, burn_in=2, progress=False)
    n_triv = per_group * S * D // group
    assert int(res.trivial.sum()) == n_triv == lyap.trivial_count(m, S, D)
    assert res.trivial[S * D - n_triv :].all()
    assert torch.isinf(res.exponents[res.trivial]).all() and torch.isfinite(res.exponents[~res.trivial]).all()
    assert math.isfinite(res.mean) and res.mean == pytest.approx(res.exponents[~res.trivial].mean().item())
    json.dumps(res.to_dict(), allow_nan=False)  # -inf is written as null


def test_project_radial_keeps_only_nontrivial_directions():
    S, D = 5, 8
    # eps = 0: the radial directions are then exactly in the kernel (eps > 0 leaves a factor ~eps/|z|^2)
    m = randomize_(fj.ItrSA(D, 2, norm="layer", norm_group=4, eps=0.0, dtype=F64), seed=4)
    X0, C = torch.randn(S, D, dtype=F64), torch.randn(S, D, dtype=F64)
    full = fj.lyapunov_spectrum(m, X0, C=C, steps=200, burn_in=5, progress=False)
    proj = fj.lyapunov_spectrum(m, X0, C=C, steps=200, burn_in=5, project_radial=True, progress=False)
    assert proj.exponents.shape[-1] == S * D - 2 * S * D // 4 and not proj.trivial.any()
    torch.testing.assert_close(proj.exponents, full.exponents[~full.trivial], rtol=0, atol=0.05)
    # the radial basis is orthogonal to every tangent the step produces
    lin_out, jvp_fn = fj.linearize(m, X0, C=C)
    basis = lyap.radial_basis(m, lin_out.unsqueeze(0))
    JT = jvp_fn(torch.randn(3, S, D, dtype=F64)).unsqueeze(1)
    assert lyap.project_off(JT, basis).sub(JT).abs().max() < 1e-12


def test_batched_equals_per_sample():
    m = randomize_(fj.ItrSA(8, 2, dtype=F64), seed=5)
    X0 = torch.randn(3, 5, 8, dtype=F64)
    res = fj.lyapunov_spectrum(m, X0, k=4, steps=15, progress=False)
    assert res.exponents.shape == (3, 4) and res.history.shape == (15, 3, 4) and res.max.shape == (3,)
    one = fj.lyapunov_spectrum(m, X0[1], k=4, steps=15, seed=1, progress=False)  # sample b uses seed + b
    torch.testing.assert_close(res.exponents[1], one.exponents, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.history[:, 1], one.history, rtol=0, atol=1e-12)


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, monkeypatch):
    m = randomize_(fj.ItrSA(8, 2, norm="rms", dtype=F64), seed=6)
    X0, C = torch.randn(5, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    common = dict(C=C, k=6, steps=30, burn_in=4, renorm_every=2, progress=False)
    ref = fj.lyapunov_spectrum(m, X0, **common)

    ckpt = str(tmp_path / "run.ckpt")
    real = lyap._lin
    for stop_at in (3, 17):  # interrupt during burn-in, then in the main loop
        calls = {"n": 0}

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real(*a, **kw)

        monkeypatch.setattr(lyap, "_lin", flaky)
        with pytest.raises(KeyboardInterrupt):
            fj.lyapunov_spectrum(m, X0, checkpoint=ckpt, checkpoint_every=5, **common)
        assert torch.load(ckpt, weights_only=False)["state"]["t"] > 0
    monkeypatch.setattr(lyap, "_lin", real)
    res = fj.lyapunov_spectrum(m, X0, checkpoint=ckpt, checkpoint_every=5, **common)
    assert torch.equal(res.exponents, ref.exponents)
    assert torch.equal(res.history, ref.history)
    with pytest.raises(ValueError, match="checkpoint: .* other inputs or settings"):
        fj.lyapunov_spectrum(m, X0 + 1, checkpoint=ckpt, **common)


def test_finite_time_dense_matches_oracle_product():
    m = randomize_(fj.ItrSA(6, 2, norm="l2", dtype=F64), seed=7)
    X, C = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    T = 5
    res = fj.finite_time_lyapunov(m, X, C=C, horizon=T)
    P = torch.eye(24, dtype=F64)
    for _ in range(T):
        P = oracle_jacobian(m, X, C) @ P
        X = m(X, C).detach()
    expected = torch.linalg.svdvals(P).log() / T
    assert int(res.trivial.sum()) == 4  # one radial direction per token
    torch.testing.assert_close(res.exponents[:20], expected[:20], rtol=0, atol=1e-10)


def test_finite_time_matrix_free_matches_dense():
    m = randomize_(fj.AKOrN(8, 2, osc_dim=4, dtype=F64), seed=8)
    X0 = m.project(torch.randn(2, 6, 8, dtype=F64))
    dense = fj.finite_time_lyapunov(m, X0, horizon=16, method="dense")
    mf = fj.finite_time_lyapunov(m, X0, horizon=16, k=5, method="matrix_free", tol=1e-10)
    assert mf.settings["method"] == "finite_time_matrix_free"
    torch.testing.assert_close(mf.exponents, dense.exponents[:, :5], rtol=0, atol=1e-7)


def test_lyapunov_bad_input():
    m = fj.ItrSA(8, 2)
    X = torch.randn(5, 8)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        fj.lyapunov_spectrum(m, X, steps=0)
    with pytest.raises(ValueError, match="k: expected at most 40"):
        fj.lyapunov_spectrum(m, X, k=41, steps=2)
    with pytest.raises(ValueError, match="k: S\\*D = 5000 is over"):
        fj.lyapunov_spectrum(fj.ItrSA(100, 2), torch.randn(50, 100), steps=2)
    with pytest.raises(ValueError, match="burn_in: project_radial needs"):
        fj.lyapunov_spectrum(m, X, steps=2, project_radial=True)
    with pytest.raises(ValueError, match="project_radial: needs a fastjac model"):
        fj.lyapunov_spectrum(fj.ItrSA(8, 2, norm="none"), X, steps=2, burn_in=1, project_radial=True)
    with pytest.raises(TypeError, match="step: expected"):
        fj.lyapunov_spectrum(3, X, steps=2)
    with pytest.raises(ValueError, match="X0: expected shape"):
        fj.lyapunov_spectrum(m, torch.randn(8), steps=2)
    with pytest.raises(TypeError, match="horizon: expected an int"):
        fj.finite_time_lyapunov(m, X, horizon=2.5)
    with pytest.raises(ValueError, match="method: expected"):
        fj.finite_time_lyapunov(m, X, method="svd")


def test_plots_render_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fastjac.plot.lyapunov import plot_lyapunov

    m = fj.ItrSA(8, 2, dtype=F64)
    res = fj.lyapunov_spectrum(m, torch.randn(4, 8, dtype=F64), steps=10, progress=False)
    path = tmp_path / "l.png"
    plot_lyapunov(res, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_main_job_writes_json_and_png(tmp_path):
    from fastjac.__main__ import main

    out = tmp_path / "run"
    args = [
        "--tokens",
        "6",
        "--dim",
        "8",
        "--heads",
        "2",
        "--k",
        "4",
        "--steps",
        "12",
        "--burn-in",
        "2",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    d = json.loads((out / "lyapunov.json").read_text())
    assert len(d["exponents"]) == 4 and d["steps"] == 12 and math.isfinite(d["max"])
    assert (out / "lyapunov.png").stat().st_size > 5000
    assert main(args) == 0  # a finished checkpoint is resumed: same numbers
    assert json.loads((out / "lyapunov.json").read_text())["exponents"] == d["exponents"]
    assert main(["jacobian", "--tokens", "5", "--dim", "8", "--heads", "2"]) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_triton_backend_and_qr_kernels_give_the_torch_exponents(dtype, tol):
    # on the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py); on CUDA they are compiled
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = randomize_(fj.ItrSA(12, 3, norm="rms", causal=True, dtype=F64), seed=9).to(dtype).to(dev)
    X0 = torch.randn(2, 7, 12, dtype=F64).to(dtype).to(dev)
    common = dict(k=5, steps=6, burn_in=1, progress=False)
    ref = fj.lyapunov_spectrum(m, X0, backend="torch", qr_backend="torch", **common)
    fast = fj.lyapunov_spectrum(m, X0, backend="triton", qr_backend="triton", **common)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=tol)


def _mp_exponents(Js, T, dps=200):
    """(1/T) ln sigma_i of the product J_{T-1} ... J_0 of the given float64 matrices, in 200-digit arithmetic."""
    import mpmath

    with mpmath.workdps(dps):
        P = mpmath.eye(Js[0].shape[0])
        for J in Js[:T]:
            P = mpmath.matrix(J.tolist()) * P
        sv = mpmath.svd_r(P, compute_uv=False)
        return sorted((float(mpmath.log(s) / T) for s in sv), reverse=True)


@pytest.mark.parametrize("horizon", [16, 64, 256])
def test_finite_time_exact_at_long_horizons_against_mpmath(horizon):
    # issue 19.3: the SVD of the dense product lost every exponent below eps * sigma_max (at horizon 256 exponents
    # 4-9 came out near -0.44 instead of -0.58 ... -0.91); the QR-accumulated product resolves them
    torch.manual_seed(0)
    m = fj.ItrSA(4, 2, dtype=F64)
    X, C = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    Js, Xs = [], X
    for _ in range(horizon):
        lin = fj.linearization(m, Xs, C=C, backend="autograd")
        Js.append(lin.dense().double())
        Xs = lin.out
    ref = torch.tensor(_mp_exponents(Js, horizon), dtype=F64)
    res = fj.finite_time_lyapunov(m, X, C=C, horizon=horizon)
    nt = int((~res.trivial).sum())
    assert nt == 9  # 3 radial directions are trivial
    torch.testing.assert_close(res.exponents[:nt], ref[:nt], rtol=0, atol=1e-9)


def test_backend_is_resolved_once_per_run(monkeypatch):
    # issue 19: "auto" used to be re-decided on every step (the C++ backend's build-cache lookup each time)
    import fastjac.backends as B

    calls = []
    real = B.select

    def counting(step, X, backend="auto"):
        if isinstance(backend, str):
            calls.append(backend)
        return real(step, X, backend)

    monkeypatch.setattr(B, "select", counting)
    m = fj.ItrSA(8, 2, dtype=F64)
    X0 = torch.randn(5, 8, dtype=F64)
    fj.lyapunov_spectrum(m, X0, k=3, steps=20, burn_in=5, progress=False)
    assert calls == ["auto"]
    calls.clear()
    fj.finite_time_lyapunov(m, X0, horizon=6)
    assert calls == ["auto"]


def test_backends_say_whether_they_are_differentiable():
    assert fj.backends.get("torch").differentiable and fj.backends.get("autograd").differentiable
    assert not fj.backends.get("triton").differentiable and not fj.backends.get("cpp").differentiable
    with pytest.raises(ValueError, match="differentiable regulariser needs 'auto' or one of"):
        fj.regularizers.jacobian_spectral(fj.ItrSA(8, 2), torch.randn(3, 8), backend="cpp")
