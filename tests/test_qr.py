"""fastjac.ops.qr (CholeskyQR2, fused Triton kernels under TRITON_INTERPRET=1 on CPU) against torch.linalg.qr.

Tolerances: Q and log|R_ii| agree with Householder to O(u cond(M)); the random matrices here have cond < 1e2, so
1e-10 in float64 and 2e-4 in float32 (u = 6e-8, times cond and a sqrt(n) growth of the Gram sums).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastjac.ops.qr import qr

BACKENDS = ["torch", "triton"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def test_triton_qr_runs_interpreted_or_on_cuda():
    # the triton cases below must really run: on CPU that needs the interpreter, set in conftest.py
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _householder(M):
    Q, R = torch.linalg.qr(M.double())
    s = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    return Q * s.unsqueeze(-2), R.diagonal(dim1=-2, dim2=-1).abs().log()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (333, 7), (100, 20), (40, 40), (2, 3, 65, 17)])
def test_qr_matches_householder(backend, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    M = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    out = torch.full_like(M, float("nan"))  # an unwritten element would stay NaN
    res = qr(M, backend=backend, out=out)
    Q, logd, fb = res.Q, res.logd, res.fallback
    assert Q.data_ptr() == out.data_ptr() and Q.dtype == dtype
    Qh, lh = _householder(M)
    torch.testing.assert_close(Q.double(), Qh, rtol=0, atol=TOL[dtype])
    torch.testing.assert_close(logd, lh, rtol=0, atol=TOL[dtype])
    assert logd.dtype == torch.float64 and not fb.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_qr_strided_input_and_output(backend):
    # the Lyapunov loop hands over tangents [k, B, n] viewed as [B, n, k]: no copies either way
    T = torch.randn(6, 3, 50, dtype=torch.float64)
    buf = torch.full_like(T, float("nan"))
    Q, logd = qr(T.permute(1, 2, 0), backend=backend, out=buf.permute(1, 2, 0))
    assert not buf.isnan().any()
    Qh, lh = _householder(T.permute(1, 2, 0))
    torch.testing.assert_close(buf.permute(1, 2, 0), Qh, rtol=0, atol=1e-12)
    torch.testing.assert_close(logd, lh, rtol=0, atol=1e-12)


def _conditioned(n, k, cond, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64)
    return (U * s) @ V.T


@pytest.mark.parametrize("backend", BACKENDS)
def test_qr_ill_conditioned_falls_back_to_householder(backend):
    well, ill = _conditioned(200, 8, 1e3, 0), _conditioned(200, 8, 1e12, 1)
    M = torch.stack([well, ill])
    res = qr(M, backend=backend)
    Q, logd, fb = res.Q, res.logd, res.fallback
    assert fb.tolist() == [False, True]  # CholeskyQR2 for the first, Householder for the second
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(Q.transpose(-1, -2) @ Q, eye.expand(2, 8, 8), rtol=0, atol=1e-12)
    Qh, lh = _householder(M)
    torch.testing.assert_close(logd, lh, rtol=0, atol=1e-8)
    torch.testing.assert_close(Q @ (Q.transpose(-1, -2) @ M), M, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_rank_deficient(backend, dtype):
    # a normalised step maps radial directions to 0: the tangent matrix loses rank
    M = torch.randn(2, 120, 6, dtype=torch.float64)
    M[0, :, 5] = M[0, :, 0] - 2 * M[0, :, 3]
    M[1, :, 2] = 0
    res = qr(M.to(dtype), backend=backend)
    Q, logd, fb = res.Q, res.logd, res.fallback
    assert fb.all()
    eye = torch.eye(6, dtype=dtype)
    torch.testing.assert_close(Q.transpose(-1, -2) @ Q, eye.expand(2, 6, 6), rtol=0, atol=10 * TOL[dtype])
    floor = torch.log(torch.tensor(100 * torch.finfo(dtype).eps * 120**0.5)).item()
    assert logd[0, 5] < floor and logd[1, 2] < floor
    assert (logd[0, :5] > -5).all()


def test_qr_bad_input():
    with pytest.raises(ValueError, match="M: expected a tall-skinny"):
        qr(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"M: expected shape \[..., n, k\]"):
        qr(torch.randn(5))
    with pytest.raises(TypeError, match="M: expected a floating-point"):
        qr(torch.ones(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="M: contains NaN"):
        qr(torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="backend: expected one of"):
        qr(torch.randn(5, 2), backend="magic")
    with pytest.raises(ValueError, match="out: expected"):
        qr(torch.randn(5, 2), out=torch.empty(5, 3))
    with pytest.raises(ValueError, match="k <= 128"):
        qr(torch.randn(300, 129), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(300, 64), (260, 100), (129, 128)])
def test_triton_qr_wide_blocks(n, k, dtype):
    # BLOCK_K = 64 and 128: the launch table's widest buckets (fastjac/ops/_launch.py), interpreted here
    g = torch.Generator().manual_seed(n + k)
    M = torch.randn(1, n, k, generator=g, dtype=torch.float64).to(dtype)
    out = torch.full_like(M, float("nan"))
    Q, logd = qr(M, backend="triton", out=out)[:2]
    Qh, lh = _householder(M)
    tol = TOL[dtype] * (20 if dtype == torch.float32 else 1)  # cond grows with k / n here (up to ~1e2 at 129 x 128)
    torch.testing.assert_close(Q.double(), Qh, rtol=0, atol=tol)
    torch.testing.assert_close(logd, lh, rtol=0, atol=tol)
