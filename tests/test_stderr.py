"""Standard errors of Lyapunov exponents and the tol= stop (issue 19), on a system whose exponents are known.

The system: a logistic-map driver u <- 4u(1 - u) (exponent ln 2 exactly) and three fibre coordinates
x_i <- exp(lambda_i + c (u - 1/2)) x_i, whose exponents are lambda_i + c (E[u] - 1/2) = lambda_i exactly (the
invariant density of the r = 4 logistic map is symmetric about 1/2). The per-step log growths fluctuate with u, so
the finite-run estimates scatter around the true values like a sample mean does.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastjac as fj
from fastjac.ops.base import BatchedLinearization

F64 = torch.float64
LAM = [-0.1, -0.3, -0.8]
TRUE = sorted(LAM + [math.log(2.0)], reverse=True)


class _SkewLin(BatchedLinearization):
    def __init__(self, X, c):
        self.X, u, x = X, X[..., :1], X[..., 1:]
        self.a = torch.exp(torch.tensor(LAM, dtype=F64) + c * (u - 0.5))  # [B, 1, 3]
        self.du, self.dx = 4 * (1 - 2 * u), c * self.a * x  # d u' / du, d x' / du
        self.out = torch.cat([4 * u * (1 - u), self.a * x], -1)

    def jvp(self, T):  # T [k, B, 1, 4]
        tu, tx = T[..., :1], T[..., 1:]
        return torch.cat([self.du * tu, self.dx * tu + self.a * tx], -1)


class _Skew(fj.RecurrentStep):
    """The skew product as a model with its own (analytic, cheap) linearisation, so 40 x 2000 steps stay fast."""

    def __init__(self, c=1.0):
        super().__init__()
        self.c, self.dim = c, 4
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=F64), requires_grad=False)  # fixes dtype and device

    def forward(self, X, C=None):
        return _SkewLin(X if X.dim() == 3 else X.unsqueeze(0), self.c).out.reshape(X.shape)

    def linearize_analytic(self, X, C=None):
        return _SkewLin(X, self.c)


def _skew(c=1.0):
    return _Skew(c)


@pytest.fixture(autouse=True)
def _one_thread():
    # [40, 4, 4] QRs: on a loaded 2-core machine the thread pool's hand-offs cost 10x the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KW = dict(k=4, burn_in=20, qr_backend="householder", progress=False)


def _x0(seeds):
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        rows.append(
            torch.cat(
                [0.05 + 0.9 * torch.rand(1, 1, generator=g, dtype=F64), torch.randn(1, 3, generator=g, dtype=F64)], -1
            )
        )
    return torch.stack(rows)  # [B, 1, 4]


def test_true_exponents_within_three_standard_errors_and_error_shrinks_like_one_over_sqrt_steps():
    X0 = _x0(range(40))
    res = fj.lyapunov_spectrum(_skew(), X0, steps=2000, **KW)
    assert res.stderr.shape == res.exponents.shape == (40, 4)
    z = (res.exponents - torch.tensor(TRUE, dtype=F64)).abs() / res.stderr
    inside = (z <= 3).double().mean(0)  # per exponent, over the 40 seeds
    assert bool((inside >= 0.95).all()), (inside, res.stderr.mean(0))
    short = fj.lyapunov_spectrum(_skew(), X0, steps=500, **KW)
    true = torch.tensor(TRUE, dtype=F64)
    # 4x the steps: half the error, both the reported one (median over the seeds; the driver's log|4 (1 - 2u)| has
    # a heavy tail that makes single standard errors noisy) and the actual one (RMS over the seeds) of the fibre
    # exponents. The driver's actual error falls like 1/steps instead: log|f'(u)| = ln 2 + h(f(u)) - h(u) is a
    # coboundary (the map is conjugate to the tent map), so its sum telescopes; its standard error is conservative.
    rms = lambda r: (r.exponents - true).square().mean(0).sqrt()  # noqa: E731
    fibre = torch.tensor([t != math.log(2.0) for t in TRUE])
    ratio_err = (rms(short) / rms(res))[fibre]
    ratio_se = short.stderr.median(0).values / res.stderr.median(0).values
    assert bool(((ratio_err > 1.4) & (ratio_err < 2.9)).all()), ratio_err
    assert bool(((ratio_se > 1.6) & (ratio_se < 2.8)).all()), ratio_se  # sqrt(4) = 2; the driver: 2.5
    d = res.to_dict()
    assert len(d["stderr"]) == 40 and d["settings"]["stderr_method"].startswith("batch means")


def test_tol_stops_early_once_every_exponent_is_resolved():
    X0 = _x0([3])[0]
    res = fj.lyapunov_spectrum(_skew(c=0.2), X0, steps=50000, tol=0.02, **KW)
    assert res.settings["stopped_early"] and res.steps < 50000 and res.settings["steps_requested"] == 50000
    assert bool((res.stderr < 0.02).all())
    assert res.history_steps[-1] == res.steps
    torch.testing.assert_close(res.exponents, torch.tensor(TRUE, dtype=F64), rtol=0, atol=4 * 0.02)
    # the cap: an unreachable tol runs every step and says it did not stop early
    capped = fj.lyapunov_spectrum(_skew(c=0.2), X0, steps=200, tol=1e-9, **KW)
    assert capped.steps == 200 and not capped.settings["stopped_early"]


def test_tol_bad_input():
    X0 = _x0([0])[0]
    with pytest.raises(ValueError, match="tol: expected a number > 0"):
        fj.lyapunov_spectrum(_skew(), X0, steps=5, tol=0.0, progress=False)
    with pytest.raises(TypeError, match="tol: expected a number"):
        fj.lyapunov_spectrum(_skew(), X0, steps=5, tol="small", progress=False)


def test_trivial_exponents_have_no_standard_error():
    torch.manual_seed(0)
    m = fj.ItrSA(8, 2, dtype=F64)
    res = fj.lyapunov_spectrum(m, torch.randn(3, 8, dtype=F64), steps=40, progress=False)
    assert bool(res.stderr[res.trivial].isnan().all()) and bool(res.stderr[~res.trivial].isfinite().all())
    assert all(v is None for v, t in zip(res.to_dict()["stderr"], res.trivial.tolist()) if t)
