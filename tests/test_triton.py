"""The Triton backend against the float64 torch.func oracle: each kernel alone, then the whole step.

Without CUDA every kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) at small odd sizes; with CUDA the same
tests run compiled on the device, plus the larger ``gpu``-marked sizes at the end.

Tolerances. float64: the kernels evaluate the same sums as the oracle in another order (online softmax, tiles), so
they agree to a few ulps times the number of terms: 1e-10 relative to the result's max entry (observed ~1e-15).
float32: unit roundoff 6e-8 grown by sums over S keys and D features: 3e-5 relative, and at most 2x the error of
the torch backend in float32 (flash-attention's rule), with a 1e-6 floor for results exact in both.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

import fastjac as fj
from fastjac import backends, config
from fastjac.ops.attention.ref import attention_probs
from fastjac.ops.norm import NormParams, norm_cache, norm_forward
from oracle import apply_dense, apply_dense_t, oracle_jacobian
from test_foundation import CASES, _ids, make, rel

triton_attn = pytest.importorskip("fastjac.ops.attention.triton")
from fastjac.ops.norm.triton import norm_residual_jvp_triton  # noqa: E402
import fastjac.ops.step.dense_triton as dense_triton  # noqa: E402
import fastjac.ops.step.triton as step_triton  # noqa: E402
import fastjac.backends.triton as tb  # noqa: E402

F64, F32 = torch.float64, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {F64: 1e-10, F32: 3e-5}
# 16-wide query/key tiles, 2 tangents and 16 value columns per program: S = 33 has a ragged third tile, k = 5 a
# ragged third tangent chunk and dv = 20 a ragged second value tile
SMALL_BLOCKS = (16, 16, 2, 16)


def _rand(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------------------- attention kernel alone

def _attention(q, k, v, beta, causal):
    return attention_probs(q, k, beta, causal) @ v


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("S,H,K,causal,dh,dv", [
    (1, 1, 1, False, 5, 7), (7, 3, 5, True, 5, 7), (33, 3, 5, False, 3, 20), (33, 1, 1, True, 16, 4),
])
def test_attention_jvp_kernel(S, H, K, causal, dh, dv, dtype):
    B, beta = (2 if S < 33 else 1), 0.6  # the interpreter pays per program: batch only the small sizes
    q, k = _rand(B, H, S, dh, seed=1), _rand(B, H, S, dh, seed=2)
    v = _rand(B, H, S, dv, seed=3)
    qd, kd, vd = _rand(K, B, H, S, dh, seed=4), _rand(K, B, H, S, dh, seed=5), _rand(K, B, H, S, dv, seed=6)
    f = lambda a, b, c: _attention(a, b, c, beta, causal)  # noqa: E731
    ref_o = f(q, k, v)
    ref_od = torch.stack([torch.func.jvp(f, (q, k, v), (qd[t], kd[t], vd[t]))[1] for t in range(K)])
    cast = lambda x: x.to(dtype=dtype, device=DEV)  # noqa: E731
    o, od = triton_attn.attention_jvp_triton(cast(q), cast(k), cast(v), cast(qd), cast(kd), cast(vd), beta, causal,
                                             blocks=SMALL_BLOCKS)
    assert o.dtype == od.dtype == dtype
    assert rel(o.cpu().double(), ref_o) < TOL[dtype] and rel(od.cpu().double(), ref_od) < TOL[dtype]
    o2 = triton_attn.attention_forward_triton(cast(q), cast(k), cast(v), beta, causal, blocks=SMALL_BLOCKS)
    assert rel(o2.cpu().double(), ref_o) < TOL[dtype]


def test_attention_kernel_rejects_bad_input():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="q, k, v"):
        triton_attn.attention_forward_triton(q, q[..., :3], q, 0.5, False)
    with pytest.raises(TypeError, match="q:"):
        triton_attn.attention_forward_triton(q.half(), q.half(), q.half(), 0.5, False)
    with pytest.raises(ValueError, match="precision"):
        triton_attn.precision_for(F32, "bf16")


# ----------------------------------------------------------------------------------- fused residual + norm kernel

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,group,gamma", [("l2", 12, True), ("rms", 4, True), ("layer", 3, True),
                                              ("layer", 12, False), ("none", 12, False), ("l2", 5, False)])
def test_norm_residual_jvp_kernel(kind, group, gamma, dtype):
    D = 15 if group == 5 else 12
    B, S, K = 2, 7, 3
    g = _rand(D, seed=1) if gamma else None
    p = NormParams(kind, g, None, 1e-3, group)
    Z = _rand(B, S, D, seed=2)
    T, R = _rand(K, B, S, D, seed=3), _rand(K, B, S, D, seed=4)
    eta = 0.7
    ref = torch.stack([torch.func.jvp(lambda z: norm_forward(z, p), (Z,), (T[t] + eta * R[t],))[1]
                       for t in range(K)])
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=DEV)  # noqa: E731
    c = norm_cache(cast(Z), NormParams(kind, cast(g), None, 1e-3, group))
    out = torch.full((K, B, S, D), float("nan"), dtype=dtype, device=DEV)
    y = norm_residual_jvp_triton(c, cast(T), cast(R), torch.tensor(eta, dtype=dtype, device=DEV), out=out)
    assert y is out and rel(y.cpu().double(), ref) < TOL[dtype]


def test_norm_kernel_rejects_bad_input():
    c = norm_cache(torch.randn(2, 3, 6), NormParams("l2", None, None, 1e-6, 3))
    with pytest.raises(ValueError, match="T, R"):
        norm_residual_jvp_triton(c, torch.randn(2, 3, 6), torch.randn(2, 3, 6), 1.0)


# ---------------------------------------------------------------------------------- the whole step, every option

@pytest.fixture(scope="module")
def oracle_cache():
    return {}


def _setup(cache, name, c, dtype):
    key = (name, str(c))
    if key not in cache:
        m, X, C = make(name, c, 2, True)
        cache[key] = (m, X, C, oracle_jacobian(m, X, C))
    m, X, C, J = cache[key]
    return (copy.deepcopy(m).to(dtype=dtype, device=DEV), X.to(dtype=dtype, device=DEV),
            C.to(dtype=dtype, device=DEV), J)


def _errors(m, X, C, J, T1, Tk, backend):
    """Relative errors of forward, k-tangent JVP, reused jvp_fn (k and 1 tangents), VJP and NaN-poisoned dense."""
    X64 = X.cpu().double()
    Y, JTk = fj.jvp(m, X, Tk, C=C, backend=backend)
    _, f = fj.linearize(m, X, C=C, backend=backend)
    _, vf = fj.vjp(m, X, C=C, backend=backend)
    lin = backends.select(m, X, backend).linearize(m, X, C, True)
    out = torch.full((X.shape[0],) + J.shape[1:], float("nan"), dtype=X.dtype, device=X.device)
    Jd = lin.dense(out=out)
    assert Jd is out and JTk.shape == Tk.shape and vf(Tk).shape == Tk.shape
    c = lambda t: t.cpu().double()  # noqa: E731
    T1d, Tkd = c(T1), c(Tk)
    with torch.no_grad():
        Y_ref = copy.deepcopy(m).cpu().double()(X64, c(C))
    return [rel(c(Y), Y_ref), rel(c(JTk), apply_dense(J, Tkd, X64)),
            rel(c(f(Tk)), apply_dense(J, Tkd, X64)), rel(c(f(T1)), apply_dense(J, T1d, X64)),
            rel(c(vf(Tk)), apply_dense_t(J, Tkd, X64)), rel(c(Jd), J)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_backend_against_oracle(case, dtype, oracle_cache):
    name, c = case
    m, X, C, J = _setup(oracle_cache, name, c, dtype)
    T1 = _rand(*X.shape, dtype=dtype, seed=7).to(DEV)
    Tk = _rand(5, *X.shape, dtype=dtype, seed=8).to(DEV)
    errs = _errors(m, X, C, J, T1, Tk, "triton")
    assert max(errs) < TOL[dtype], errs
    if dtype == F32:
        errs_torch = _errors(m, X, C, J, T1, Tk, "torch")
        for e_fast, e_ref in zip(errs, errs_torch):
            assert e_fast <= max(2 * e_ref, 1e-6), (errs, errs_torch)


def test_dense_row_chunks_and_unbatched(monkeypatch, oracle_cache):
    name, c = CASES[2]  # S = 33, causal LayerNorm
    m, X, C, J = _setup(oracle_cache, name, c, F64)
    monkeypatch.setattr(dense_triton, "DENSE_FACTOR_BYTES", 1)  # one token row per launch
    assert rel(fj.jacobian(m, X, C=C, backend="triton").cpu(), J) < 1e-10
    assert rel(fj.jacobian(m, X[1], C=C[1], backend="triton").cpu(), J[1]) < 1e-10


def test_vjp_cotangent_chunks(monkeypatch, oracle_cache):
    name, c = CASES[-2]  # AKOrN, S = 33
    m, X, C, J = _setup(oracle_cache, name, c, F64)
    monkeypatch.setattr(step_triton, "VJP_CHUNK_BYTES", 1)  # one cotangent at a time
    G = _rand(3, *X.shape, seed=9).to(DEV)
    _, vf = fj.vjp(m, X, C=C, backend="triton")
    assert rel(vf(G).cpu(), apply_dense_t(J, G.cpu(), X.cpu())) < 1e-10


def test_linearize_runs_the_forward_once(monkeypatch):
    m, X, C = make("ItrSA", CASES[0][1], 2, True)
    m, X, C = m.to(DEV), X.to(DEV), C.to(DEV)
    calls = []
    real = step_triton.msa_forward_triton
    monkeypatch.setattr(step_triton, "msa_forward_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, f = fj.linearize(m, X, C=C, backend="triton")
    T = _rand(3, *X.shape, seed=2).to(DEV)
    first = f(T)
    for _ in range(3):
        torch.testing.assert_close(f(T), first, rtol=0, atol=0)
    assert len(calls) == 1


# -------------------------------------------------------------------------------------------- selection, config

def test_auto_never_picks_the_interpreter_and_says_why():
    m = fj.ItrSA(8, 2)
    s = fj.info(m, torch.randn(3, 8))
    assert s.startswith("backend='auto' -> torch") and "triton: X is on cpu" in s and "backend='triton'" in s


def test_triton_why_not_reasons(monkeypatch):
    be = backends._BACKENDS["triton"]
    m = fj.ItrSA(8, 2)
    X = torch.randn(1, 3, 8)
    assert "no triton kernels are registered for function" in be.why_not(lambda x: x, X)
    assert "bfloat16" in be.why_not(m.bfloat16(), X.bfloat16())
    with pytest.raises(ValueError, match="'triton' cannot handle this input: dtype torch.bfloat16"):
        fj.jvp(m.bfloat16(), X.bfloat16()[0], X.bfloat16()[0], backend="triton")
    monkeypatch.setattr(tb, "interpreter_on", lambda: False)
    if X.device.type != "cuda":
        assert "not CUDA, and the Triton interpreter is off" in be.why_not(fj.ItrSA(8, 2), X)
    monkeypatch.setattr(tb, "_kernels", "triton is not installed or failed to import (ImportError: x)")
    assert be.why_not(fj.ItrSA(8, 2), X).startswith("triton is not installed")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="'auto' picks triton only for CUDA tensors")
def test_auto_picks_triton_on_cuda():
    m = fj.ItrSA(8, 2).cuda()
    assert fj.info(m, torch.randn(3, 8, device="cuda")).startswith("backend='auto' -> triton")


def test_matmul_precision_setting():
    assert config.matmul_precision == "ieee"
    assert triton_attn.precision_for(F32) == "ieee" and triton_attn.precision_for(F64, "tf32") == "ieee"
    with pytest.raises(ValueError, match="matmul_precision"):
        with config.settings(matmul_precision="fp8"):
            pass
    with pytest.raises(ValueError, match="precision"):
        config.set_matmul_precision("half")
    m, X, C = make("ItrSA", CASES[0][1], 0, True, dtype=F32)
    m, X, C = m.to(DEV), X.to(DEV), C.to(DEV)
    T = _rand(2, *X.shape, dtype=F32, seed=3).to(DEV)
    ref = fj.jvp(m, X, T, C=C, backend="torch")[1]
    with config.settings(matmul_precision="tf32"):
        assert triton_attn.precision_for(F32) == "tf32"
        fast = fj.jvp(m, X, T, C=C, backend="triton")[1]
    # TF32 keeps 10 mantissa bits (2^-11 ~ 5e-4 per operand); sums over S keys and D features stay near 1e-3
    assert rel(fast, ref) < 1e-2


# ------------------------------------------------------------------------------------------- GPU, larger sizes

@pytest.mark.gpu
@pytest.mark.parametrize("S,D,H,k,norm,causal", [(81, 128, 8, 16, "l2", False), (257, 64, 4, 64, "layer", True)])
def test_gpu_larger_jvp(S, D, H, k, norm, causal):
    m = fj.ItrSA(D, H, norm=norm, causal=causal, dtype=F64, device="cuda")
    X = torch.randn(2, S, D, dtype=F64, device="cuda")
    T = torch.randn(k, 2, S, D, dtype=F64, device="cuda")
    ref = fj.jvp(m, X, T, backend="torch")[1]
    assert rel(fj.jvp(m, X, T, backend="triton")[1], ref) < 1e-10
    m32 = copy.deepcopy(m).float()
    assert rel(fj.jvp(m32, X.float(), T.float(), backend="triton")[1].double(), ref) < 3e-5
    with config.settings(matmul_precision="tf32"):
        assert rel(fj.jvp(m32, X.float(), T.float(), backend="triton")[1].double(), ref) < 1e-2


@pytest.mark.gpu
def test_gpu_larger_dense():
    m = fj.ItrSA(64, 4, norm="rms", bias=True, dtype=F64, device="cuda")
    X = torch.randn(2, 48, 64, dtype=F64, device="cuda")
    ref = fj.jacobian(m, X, backend="torch")
    out = torch.full_like(ref, float("nan"))
    lin = backends.select(m, X, "triton").linearize(m, X, None, True)
    assert rel(lin.dense(out=out), ref) < 1e-10
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lin.dense(out=out)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 5.0
