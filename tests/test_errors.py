"""Bad input gets a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastjac as fj

F64 = torch.float64


@pytest.fixture
def m():
    return fj.ItrSA(12, 3, dtype=F64)


@pytest.fixture
def X():
    return torch.randn(2, 5, 12, dtype=F64)


def test_state_shape(m):
    with pytest.raises(ValueError, match=r"X: expected shape \[S, D\] or \[B, S, D\], got \(12,\)"):
        fj.jvp(m, torch.randn(12, dtype=F64), torch.randn(12, dtype=F64))
    with pytest.raises(ValueError, match=r"X: last dimension 11 does not match the model's dim=12"):
        fj.jacobian(m, torch.randn(5, 11, dtype=F64))


def test_tangent_shape(m, X):
    with pytest.raises(ValueError, match=r"T: expected shape \(2, 5, 12\) or \(k,\) \+ \(2, 5, 12\)"):
        fj.jvp(m, X, torch.randn(5, 12, dtype=F64))
    _, f = fj.linearize(m, X)
    with pytest.raises(ValueError, match=r"T: expected shape"):
        f(torch.randn(3, 2, 5, 13, dtype=F64))
    _, g = fj.vjp(m, X)
    with pytest.raises(ValueError, match=r"G: expected shape"):
        g(torch.randn(1, 1, 2, 5, 12, dtype=F64))


def test_input_shape(m, X):
    with pytest.raises(ValueError, match=r"C: expected shape \(2, 5, 12\) \(or \[S, D\] for a batch\), got \(4, 12\)"):
        fj.jvp(m, X, X, C=torch.randn(4, 12, dtype=F64))
    with pytest.raises(ValueError, match=r"C: expected shape"):
        m(X, torch.randn(3, 5, 12, dtype=F64))


def test_dtype_mismatch(m, X):
    with pytest.raises(TypeError, match=r"X: dtype torch.float32 does not match the model's torch.float64"):
        fj.jvp(m, X.float(), X.float())
    with pytest.raises(TypeError, match=r"T: dtype torch.float32 does not match the state/model dtype torch.float64"):
        fj.jvp(m, X, X.float())
    with pytest.raises(TypeError, match=r"C: dtype torch.float32"):
        fj.vjp(m, X, C=X.float())
    with pytest.raises(TypeError, match=r"X: expected a floating-point tensor, got dtype torch.int64"):
        fj.jacobian(m, torch.ones(5, 12, dtype=torch.long))
    with pytest.raises(TypeError, match=r"X: expected a torch.Tensor, got list"):
        fj.jacobian(m, [[1.0] * 12])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device (CUDA)")
def test_device_mismatch(m, X):
    with pytest.raises(ValueError, match=r"X: device cuda:0 does not match the model's cpu"):
        fj.jvp(m, X.cuda(), X.cuda())


def test_device_check_message():
    # the device check itself, runnable without a GPU: a 'meta' tensor is on another device
    from fastjac._checks import check_tensor

    with pytest.raises(ValueError, match=r"T: device meta does not match the state/model device cpu"):
        check_tensor("T", torch.empty(3, device="meta"), device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(m, X, bad):
    Xb = X.clone()
    Xb[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"X: contains NaN or inf"):
        fj.jvp(m, Xb, X)
    with pytest.raises(ValueError, match=r"T: contains NaN or inf"):
        fj.jvp(m, X, Xb)
    with pytest.raises(ValueError, match=r"C: contains NaN or inf"):
        fj.jacobian(m, X, C=Xb)
    with fj.config.settings(check_finite=False):
        fj.jvp(m, X, Xb)  # the check can be switched off for trusted hot loops


def test_model_options():
    with pytest.raises(ValueError, match=r"norm_group: must divide dim=12, got 5"):
        fj.ItrSA(12, 3, norm_group=5)
    with pytest.raises(ValueError, match=r"osc_dim: must divide dim=12, got 5"):
        fj.AKOrN(12, 3, osc_dim=5)
    with pytest.raises(ValueError, match=r"norm: expected one of"):
        fj.ItrSA(12, 3, norm="batch")
    with pytest.raises(ValueError, match=r"value_dim: without an output projection the values are D=12 wide"):
        fj.ItrSA(12, 3, out_proj=False, value_dim=4)
    with pytest.raises(ValueError, match=r"heads: expected an int >= 1, got 0"):
        fj.ItrSA(12, 0)
    with pytest.raises(TypeError, match=r"dim: expected an int, got float"):
        fj.ItrSA(12.0, 3)


def test_dense_memory_limit(m):
    X = torch.randn(4, 100, 12, dtype=F64)  # 4 x [1200, 1200] float64 = 0.046 GB
    with pytest.raises(
        ValueError,
        match=r"dense Jacobian would be 4 x \[1200, 1200\] torch.float64 = 0.05 GB, over the "
        r"limit of 0.01 GB .*fastjac.jvp / fastjac.linearize",
    ):
        fj.jacobian(m, X, max_gb=0.01)
    old = fj.config.dense_limit_gb
    try:
        fj.config.set_dense_limit_gb(0.02)
        with pytest.raises(ValueError, match=r"over the limit of 0.02 GB"):
            fj.jacobian(m, X)
    finally:
        fj.config.set_dense_limit_gb(old)
    with pytest.raises(ValueError, match=r"gb: expected a positive number"):
        fj.config.set_dense_limit_gb(-1)


def test_backend_names(m, X):
    with pytest.raises(
        ValueError,
        match=r"backend: expected one of \['auto', 'torch', 'autograd', 'triton'.*\], "
        r"got 'fast'",
    ):
        fj.jvp(m, X, X, backend="fast")
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'cuda'"):  # no such backend
        fj.jvp(m, X, X, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: 'torch' cannot handle this input: step is a function"):
        fj.jvp(lambda x: x, X, X, backend="torch")


def test_step_contract(X):
    with pytest.raises(TypeError, match=r"step: expected a fastjac model or a callable"):
        fj.jvp(3, X, X)
    with pytest.raises(ValueError, match=r"step: a step must map X to X's shape, got \(2, 5, 6\)"):
        fj.jvp(lambda x: x[..., :6], X, X)
