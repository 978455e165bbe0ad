"""The public seam (issue 13): fj.linearization / Linearization, a model defined outside fastjac working end to end
through the RecurrentStep base, backend registration visible in fj.info, and one linearisation per state."""

import math
from typing import Optional

import pytest
import torch
from oracle import apply_dense, apply_dense_t, oracle_jacobian
from torch import Tensor

import fastjac as fj
from fastjac import backends
from fastjac.backends.torch import TorchBackend
from fastjac.ops.attention import msa_cache, msa_forward, msa_jacobian_rows, msa_jvp, msa_vjp
from fastjac.ops.base import BatchedLinearization

F64 = torch.float64


# ------------------------------------------------------------- a model defined here, with its own op functions


def tanh_forward(Z: Tensor) -> Tensor:
    return torch.tanh(Z)


def tanh_jvp(Y: Tensor, T: Tensor) -> Tensor:
    # d tanh(Z) = (1 - tanh(Z)^2) dZ, with Y = tanh(Z); elementwise, so the VJP is the same product
    return (1 - Y**2) * T


class TanhItrSALinearization(BatchedLinearization):
    """X' = tanh(X + eta (C + MSA(X))) at X [B, S, D], from fastjac's attention ops plus the tanh op above."""

    def __init__(self, X, C, model):
        self.X, self.eta = X, model.eta
        self.attn = msa_cache(X, model.attn_params())
        F = self.attn.out if C is None else C + self.attn.out
        self.out = tanh_forward(X + self.eta * F)

    def jvp(self, T):
        return tanh_jvp(self.out, T + self.eta * msa_jvp(self.attn, T))

    def vjp(self, G):
        gz = tanh_jvp(self.out, G)
        return gz + self.eta * msa_vjp(self.attn, gz)

    def dense(self, out=None):
        B, S, D = self.X.shape
        rows = msa_jacobian_rows(self.attn, 0, S, scale=self.eta)  # [B, S, D, S, D]
        idx = torch.arange(S)
        rows[:, idx, :, idx, :] += torch.eye(D, dtype=self.X.dtype)
        rows = rows * (1 - self.out**2)[:, :, :, None, None]  # the tanh factor on each output row
        J = rows.reshape(B, S * D, S * D)
        return J if out is None else out.copy_(J)


class TanhItrSA(fj.RecurrentStep):
    """A small variant of ItrSA that fastjac does not know: tanh instead of a normalisation."""

    def __init__(self, dim, heads, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.dim, self.heads = dim, heads
        dh = dim // heads
        mk = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype) / math.sqrt(dim))  # noqa
        self.wq, self.wk, self.wv, self.wo = (
            mk(heads, dim, dh),
            mk(heads, dim, dh),
            mk(heads, dim, dh),
            mk(heads, dh, dim),
        )
        self.eta = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.beta = 1 / math.sqrt(dh)

    def attn_params(self):
        return fj.ops.AttnParams(self.wq, self.wk, self.wv, self.wo, None, None, None, None, self.beta, False)

    def forward(self, X, C=None):
        F = msa_forward(X, self.attn_params())
        return tanh_forward(X + self.eta * (F if C is None else C + F))

    def linearize_analytic(self, X, C: Optional[Tensor] = None):
        return TanhItrSALinearization(X, C, self)


@pytest.fixture
def tanh_case():
    m = TanhItrSA(12, 3)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 7, 12, generator=g, dtype=F64)
    C = torch.randn(2, 7, 12, generator=g, dtype=F64)
    return m, X, C


def test_a_model_defined_outside_fastjac_gets_the_analytic_path(tanh_case):
    m, X, C = tanh_case
    J = oracle_jacobian(m, X, C)
    assert fj.linearization(m, X, C=C).backend == "torch"
    assert "triton: no triton kernels are registered for TanhItrSA" in fj.info(m, X)
    T = torch.randn(5, *X.shape, dtype=F64)
    Y, JT = fj.jvp(m, X, T, C=C)
    torch.testing.assert_close(Y, m(X, C), rtol=0, atol=1e-14)
    torch.testing.assert_close(JT, apply_dense(J, T, X), rtol=1e-12, atol=1e-12)
    _, vf = fj.vjp(m, X, C=C)
    torch.testing.assert_close(vf(T), apply_dense_t(J, T, X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fj.jacobian(m, X, C=C), J, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fj.jacobian(m, X, C=C, backend="autograd"), J, rtol=1e-12, atol=1e-12)


def test_a_model_defined_outside_fastjac_runs_lyapunov(tanh_case):
    m, X, C = tanh_case
    kw = dict(C=C[0], k=6, steps=40, burn_in=3, progress=False)
    fast = fj.lyapunov_spectrum(m, X[0], backend="torch", **kw)
    ref = fj.lyapunov_spectrum(m, X[0], backend="autograd", **kw)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-10)
    assert not bool(fast.trivial.any())  # trivial_count() defaults to 0: tanh kills no direction
    ft = fj.finite_time_lyapunov(m, X[0], C=C[0], horizon=4)
    assert ft.exponents.shape == (7 * 12,)


def test_a_subclass_that_changes_forward_never_gets_its_parents_jacobian():
    class ShiftedItrSA(fj.ItrSA):
        def forward(self, X, C=None):
            return super().forward(2.0 * X, C)

    torch.manual_seed(0)
    m = ShiftedItrSA(8, 2, dtype=F64)
    X = torch.randn(5, 8, dtype=F64)
    with pytest.raises(ValueError, match="overrides forward .* inherits linearize_analytic"):
        fj.jacobian(m, X, backend="torch")
    with pytest.raises(ValueError, match="no triton kernels are registered for ShiftedItrSA"):
        fj.jacobian(m, X, backend="triton")
    lin = fj.linearization(m, X)  # "auto" falls through to torch.func on the model's real forward
    assert lin.backend == "autograd"
    torch.testing.assert_close(lin.dense(), oracle_jacobian(m, X), rtol=0, atol=1e-13)


class _EchoBackend(backends.Backend):
    name = "echo"

    def why_not(self, step, X):
        return None if isinstance(step, TanhItrSA) else "only for TanhItrSA"

    def linearize(self, step, X, C, batched):
        return step.linearize_analytic(X, C)


def test_a_registered_backend_shows_in_info_and_can_be_chosen(tanh_case):
    m, X, C = tanh_case
    backends.register_backend(_EchoBackend())
    try:
        assert "echo" in backends.available()
        assert "echo: ok" in fj.info(m, X)
        assert "echo: only for TanhItrSA" in fj.info(fj.ItrSA(12, 3), X.float())
        assert fj.linearization(m, X, C=C, backend="echo").backend == "echo"
        assert fj.linearization(m, X, C=C).backend == "torch"  # registered without auto_priority
    finally:
        backends.unregister_backend("echo")
    assert "echo" not in fj.info(m, X)


def test_linearization_shapes_batched_and_not():
    torch.manual_seed(0)
    m = fj.ItrSA(8, 2, norm="rms", dtype=F64)
    X = torch.randn(3, 5, 8, dtype=F64)
    lin = fj.linearization(m, X)
    one = fj.linearization(m, X[1])
    assert lin.batched and not one.batched and lin.out.shape == X.shape and one.out.shape == X[1].shape
    T = torch.randn(4, 3, 5, 8, dtype=F64)
    torch.testing.assert_close(lin.jvp(T)[:, 1], one.jvp(T[:, 1]), rtol=0, atol=1e-14)
    torch.testing.assert_close(lin.jvp(T[0])[1], one.jvp(T[0, 1]), rtol=0, atol=1e-14)
    torch.testing.assert_close(lin.vjp(T)[:, 2], fj.linearization(m, X[2]).vjp(T[:, 2]), rtol=0, atol=1e-14)
    assert lin.jvp(T[:0]).shape == (0, 3, 5, 8)  # no tangents: an empty answer, not an internal error
    torch.testing.assert_close(lin.dense()[1], one.dense(), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="T: expected shape"):
        lin.jvp(T[:, :2])
    with pytest.raises(ValueError, match="part"):
        fj.linearization(m, X, part="norm")


def test_one_linearisation_per_state_per_call(monkeypatch):
    torch.manual_seed(0)
    m = fj.ItrSA(8, 2, dtype=F64)
    X = torch.randn(2, 5, 8, dtype=F64)
    calls = []
    real = TorchBackend.linearize
    monkeypatch.setattr(TorchBackend, "linearize", lambda self, *a: calls.append(1) or real(self, *a))
    # backend named: under no_grad "auto" may pick a compiled backend, whose calls this counter would not see
    for kw in (dict(method="dense"), dict(method="lanczos")):
        calls.clear()
        fj.spectral_norm(m, X, backend="torch", **kw)
        assert len(calls) == 2, kw  # one per sample
    calls.clear()
    fj.eigvals(m, X[0], k=3, method="arnoldi", backend="torch")
    assert len(calls) == 1
    calls.clear()
    fj.jacobian(m, X, backend="torch")
    assert len(calls) == 1


def test_removed_0_2_spellings_are_a_clear_type_error():
    # fastjac 0.3 removed the 0.2 spellings (T=, generator=, model=, return_fallback=, return_vectors=): each is now
    # an unexpected keyword, named in the TypeError
    torch.manual_seed(0)
    m = fj.ItrSA(8, 2, dtype=F64)
    X = torch.randn(5, 8, dtype=F64)
    cases = [
        (lambda: fj.finite_time_lyapunov(m, X, T=3), "T"),
        (lambda: fj.spectral_norm(m, X, generator=torch.Generator().manual_seed(4)), "generator"),
        (lambda: fj.prop51_bound(model=m, X=X), "model"),
        (lambda: fj.ops.qr(torch.randn(30, 4, dtype=F64), return_fallback=True), "return_fallback"),
        (lambda: fj.linalg.eigsh(lambda V: V, 10, 2, return_vectors=True), "return_vectors"),
    ]
    for call, name in cases:
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            call()
    res = fj.ops.qr(torch.randn(30, 4, dtype=F64))
    assert len(res) == 2 and res.fallback.shape == ()


def test_return_types_do_not_change_with_batching():
    torch.manual_seed(0)
    m = fj.ItrSA(8, 2, dtype=F64)
    X = torch.randn(2, 5, 8, dtype=F64)
    for f in (
        lambda x: fj.spectral_norm(m, x),
        lambda x: fj.lyapunov_spectrum(m, x, k=2, steps=3, progress=False).max,
        lambda x: fj.prop51_bound(m, x).measured,
    ):
        a, b = f(X), f(X[0])
        assert isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == (2,) and b.shape == ()
