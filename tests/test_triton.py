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
from oracle import apply_dense, apply_dense_t, oracle_jacobian
from test_foundation import CASES, _ids, make, rel

import fastjac as fj
from fastjac import backends, config
from fastjac.ops.attention.ref import AttnParams, attention_probs
from fastjac.ops.norm import NormParams, norm_cache, norm_forward

triton_attn = pytest.importorskip("fastjac.ops.attention.triton")
import fastjac.backends.triton as tb  # noqa: E402
import fastjac.ops.step.dense_triton as dense_triton  # noqa: E402
import fastjac.ops.step.triton as step_triton  # noqa: E402
from fastjac.ops.norm.triton import norm_residual_jvp_triton  # noqa: E402

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


ATTN_CASES = [
    (1, 1, 1, False, 5, 7),
    (7, 3, 5, True, 5, 7),
    (33, 3, 5, False, 3, 20),
    (33, 1, 1, True, 16, 4),
    (100, 2, 3, True, 12, 24),
    (33, 2, 2, False, 40, 24),
]  # dh = 40: BDH = 64, head dim split


def _attn_inputs(S, H, K, dh, dv):
    B = 2 if S < 33 else 1  # the interpreter pays per program: batch only the small sizes
    return (
        _rand(B, H, S, dh, seed=1),
        _rand(B, H, S, dh, seed=2),
        _rand(B, H, S, dv, seed=3),
        _rand(K, B, H, S, dh, seed=4),
        _rand(K, B, H, S, dh, seed=5),
        _rand(K, B, H, S, dv, seed=6),
    )


def _attn_ref(ins, beta, causal):
    q, k, v, qd, kd, vd = ins
    f = lambda a, b, c: _attention(a, b, c, beta, causal)  # noqa: E731
    return f(q, k, v), torch.stack([torch.func.jvp(f, (q, k, v), (qd[t], kd[t], vd[t]))[1] for t in range(len(qd))])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("S,H,K,causal,dh,dv", ATTN_CASES)
def test_attention_jvp_kernel(S, H, K, causal, dh, dv, dtype):
    beta = 0.6
    ins = _attn_inputs(S, H, K, dh, dv)
    ref_o, ref_od = _attn_ref(ins, beta, causal)
    cast = lambda x: x.to(dtype=dtype, device=DEV)  # noqa: E731
    blocks = None if DEV == "cuda" else SMALL_BLOCKS
    o, od = triton_attn.attention_jvp_triton(*map(cast, ins), beta, causal, blocks=blocks)
    assert o.dtype == od.dtype == dtype
    assert rel(o.cpu().double(), ref_o) < TOL[dtype] and rel(od.cpu().double(), ref_od) < TOL[dtype]
    o2 = triton_attn.attention_forward_triton(*map(cast, ins[:3]), beta, causal, blocks=blocks)
    assert rel(o2.cpu().double(), ref_o) < TOL[dtype]
    # the interpreter's default tiles (32 x 32) too: other raggedness than SMALL_BLOCKS
    if DEV == "cpu" and S >= 33:
        o3, od3 = triton_attn.attention_jvp_triton(*map(cast, ins), beta, causal)
        assert rel(o3.double(), ref_o) < TOL[dtype] and rel(od3.double(), ref_od) < TOL[dtype]


# float16 runs in the interpreter (numpy has float16), bfloat16 does not (numpy has none: the interpreter returns
# garbage, so the kernels refuse it there); bfloat16 is checked by compilation only (tests/test_aot.py) unless CUDA.
# Reference: the float64 oracle on the inputs rounded to the low precision, so the error is the computation's alone.
# Tolerance: float16 keeps 11 significant bits (u = 4.9e-4); the kernels accumulate in float32 and round p and
# p * Ldot to float16 once per product, so the error stays near u: 4e-3 relative to the max entry, and at most 2x the
# torch path's error in the same dtype (torch rounds every intermediate to float16, so it is usually far worse).
# bfloat16 (8 bits, u = 3.9e-3): 3e-2.
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
HALF_DTYPES = [
    pytest.param(torch.float16, id="f16"),
    pytest.param(
        torch.bfloat16,
        id="bf16",
        marks=pytest.mark.skipif(
            DEV != "cuda",
            reason="bfloat16 cannot run under the Triton interpreter (numpy has no "
            "bfloat16); compile-only check in tests/test_aot.py",
        ),
    ),
]
HALF_REPORT = []  # (what, dtype, triton error, torch error) of every low-precision test, printed at the end


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("S,H,K,causal,dh,dv", ATTN_CASES)
def test_attention_jvp_kernel_half(S, H, K, causal, dh, dv, dtype):
    beta = 0.6
    ins = [x.to(dtype) for x in _attn_inputs(S, H, K, dh, dv)]
    ref_o, ref_od = _attn_ref([x.double() for x in ins], beta, causal)
    t_o, t_od = _attn_ref([x.to(DEV) for x in ins], beta, causal)  # torch ops in the same dtype
    blocks = None if DEV == "cuda" else SMALL_BLOCKS
    o, od = triton_attn.attention_jvp_triton(*[x.to(DEV) for x in ins], beta, causal, blocks=blocks)
    assert o.dtype == od.dtype == dtype
    e = (rel(o.cpu().double(), ref_o), rel(od.cpu().double(), ref_od))
    et = (rel(t_o.cpu().double(), ref_o), rel(t_od.cpu().double(), ref_od))
    HALF_REPORT.append((f"attention S={S} H={H} K={K} causal={causal}", str(dtype), e, et))
    for a, b in zip(e, et):
        assert a < HALF_TOL[dtype] and a <= max(2 * b, 1e-3), (e, et)


def test_attention_kernel_rejects_bad_input():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="q, k, v"):
        triton_attn.attention_forward_triton(q, q[..., :3], q, 0.5, False)
    with pytest.raises(TypeError, match="q:"):
        triton_attn.attention_forward_triton(q.int(), q.int(), q.int(), 0.5, False)
    with pytest.raises(TypeError, match="q:"):
        triton_attn.attention_forward_triton(q.half(), q, q, 0.5, False)
    if DEV == "cpu":
        with pytest.raises(TypeError, match="bfloat16 does not run under the Triton interpreter"):
            triton_attn.attention_forward_triton(q.bfloat16(), q.bfloat16(), q.bfloat16(), 0.5, False)
    with pytest.raises(ValueError, match="precision"):
        triton_attn.precision_for(F32, "bf16")


def test_msa_jvp_reuses_the_forward(monkeypatch):
    # msa_forward_triton leaves its lse on q; msa_jvp_triton then launches the tangent kernel only, and after an
    # in-place change of q it runs the forward again (never stale statistics)
    H, D, dh = 3, 12, 4
    w = [_rand(H, D, dh, seed=s).to(DEV) for s in (3, 4, 5)]
    pa = AttnParams(*w, None, None, None, None, None, 0.5, False)
    X, T = _rand(2, 7, D, seed=1).to(DEV), _rand(3, 2, 7, D, seed=2).to(DEV)
    _, q, k, v, _ = triton_attn.msa_forward_triton(X, pa)
    calls = []
    real = triton_attn.attn_fwd_launch
    monkeypatch.setattr(triton_attn, "attn_fwd_launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    a = triton_attn.msa_jvp_triton(pa, q, k, v, T)
    assert calls == []
    q.mul_(1.0)  # bumps q's version counter
    b = triton_attn.msa_jvp_triton(pa, q, k, v, T)
    assert calls == [1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- fused residual + norm kernel


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "kind,group,gamma",
    [
        ("l2", 12, True),
        ("rms", 4, True),
        ("layer", 3, True),
        ("layer", 12, False),
        ("none", 12, False),
        ("l2", 5, False),
    ],
)
def test_norm_residual_jvp_kernel(kind, group, gamma, dtype):
    D = 15 if group == 5 else 12
    B, S, K = 2, 7, 3
    g = _rand(D, seed=1) if gamma else None
    p = NormParams(kind, g, None, 1e-3, group)
    Z = _rand(B, S, D, seed=2)
    T, R = _rand(K, B, S, D, seed=3), _rand(K, B, S, D, seed=4)
    eta = 0.7
    ref = torch.stack([torch.func.jvp(lambda z: norm_forward(z, p), (Z,), (T[t] + eta * R[t],))[1] for t in range(K)])
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=DEV)  # noqa: E731
    c = norm_cache(cast(Z), NormParams(kind, cast(g), None, 1e-3, group))
    out = torch.full((K, B, S, D), float("nan"), dtype=dtype, device=DEV)
    y = norm_residual_jvp_triton(c, cast(T), cast(R), torch.tensor(eta, dtype=dtype, device=DEV), out=out)
    assert y is out and rel(y.cpu().double(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "kind,group,gamma", [("l2", 12, True), ("layer", 3, True), ("rms", 4, False), ("l2", 5, False)]
)
def test_norm_residual_jvp_kernel_half(kind, group, gamma, dtype):
    D = 15 if group == 5 else 12
    B, S, K, eta = 2, 7, 3, 0.7
    g = _rand(D, seed=1).to(dtype) if gamma else None
    Z, T, R = _rand(B, S, D, seed=2).to(dtype), _rand(K, B, S, D, seed=3).to(dtype), _rand(K, B, S, D, seed=4).to(dtype)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    p64 = NormParams(kind, up(g), None, 1e-3, group)
    ref = torch.stack(
        [
            torch.func.jvp(lambda z: norm_forward(z, p64), (Z.double(),), (T[t].double() + eta * R[t].double(),))[1]
            for t in range(K)
        ]
    )
    p16 = NormParams(kind, g, None, 1e-3, group)
    tor = torch.stack([torch.func.jvp(lambda z: norm_forward(z, p16), (Z,), (T[t] + eta * R[t],))[1] for t in range(K)])
    dev = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    c = norm_cache(Z.to(DEV), NormParams(kind, dev(g), None, 1e-3, group))
    out = torch.full((K, B, S, D), float("nan"), dtype=dtype, device=DEV)
    y = norm_residual_jvp_triton(c, T.to(DEV), R.to(DEV), eta, out=out)
    e, et = rel(y.cpu().double(), ref), rel(tor.double(), ref)
    HALF_REPORT.append((f"norm {kind} N={group}", str(dtype), e, et))
    # the cache (w, s) is itself float16 (torch's norm_cache): both paths start from the same rounded statistics
    assert y is out and e < HALF_TOL[dtype] and e <= max(2 * et, 1e-3), (e, et)


def _dense_from_factors(A, R1, U, rb, Ed, i0, i1):
    # out[i, a, m, b] = sum_h A[h, i, m] R1[i, h, a, b] + U[h, i, m, a] rb[i, h, b] + delta_im Ed[i, a, b]
    H, S, _ = A.shape
    D = Ed.shape[-1]
    out = torch.einsum("him,ihab->iamb", A[:, i0:i1], R1) + torch.einsum("hima,ihb->iamb", U, rb[i0:i1])
    idx = torch.arange(i1 - i0)
    out[idx, :, idx + i0, :] += Ed
    return out.reshape((i1 - i0) * D, S * D)


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="f64"), pytest.param(F32, id="f32")] + HALF_DTYPES)
@pytest.mark.parametrize(
    "S,D,H,i0,i1,expand", [(7, 5, 2, 0, 7, False), (33, 12, 3, 10, 29, True), (9, 40, 1, 8, 9, False)]
)
def test_dense_kernel_from_factors(S, D, H, i0, i1, expand, dtype):
    I = i1 - i0
    A = torch.softmax(_rand(H, S, S, seed=1), -1)
    R1 = _rand(H, D, D, seed=2).unsqueeze(0).expand(I, H, D, D) if expand else _rand(I, H, D, D, seed=2)
    U, rb, Ed = _rand(H, I, S, D, seed=3), _rand(S, H, D, seed=4), _rand(I, D, D, seed=5)
    fac = [x.to(dtype) for x in (A, R1, U, rb, Ed)]
    ref = _dense_from_factors(*[x.double() for x in fac], i0, i1)
    out = torch.full((S * D, S * D), float("nan"), dtype=dtype, device=DEV)
    dense_triton.step_dense_launch(*[x.to(DEV) for x in fac], out, i0, i1)
    got = out[i0 * D : i1 * D]
    assert not got.isnan().any() and out[: i0 * D].isnan().all() and out[i1 * D :].isnan().all()
    e = rel(got.cpu().double(), ref)
    if dtype in (F64, F32):
        assert e < TOL[dtype], e
    else:
        tor = (
            _dense_from_factors(*fac, i0, i1)
            if DEV == "cpu"
            else _dense_from_factors(*[x.to(DEV) for x in fac], i0, i1)
        )
        et = rel(tor.cpu().double(), ref)
        HALF_REPORT.append((f"dense S={S} D={D} H={H}", str(dtype), e, et))
        assert e < HALF_TOL[dtype] and e <= max(2 * et, 1e-3), (e, et)


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
    return (
        copy.deepcopy(m).to(dtype=dtype, device=DEV),
        X.to(dtype=dtype, device=DEV),
        C.to(dtype=dtype, device=DEV),
        J,
    )


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
    return [
        rel(c(Y), Y_ref),
        rel(c(JTk), apply_dense(J, Tkd, X64)),
        rel(c(f(Tk)), apply_dense(J, Tkd, X64)),
        rel(c(f(T1)), apply_dense(J, T1d, X64)),
        rel(c(vf(Tk)), apply_dense_t(J, Tkd, X64)),
        rel(c(Jd), J),
    ]


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


@pytest.fixture(scope="module", autouse=True)
def _report_half_errors(request):
    # the low-precision tests' errors against float64, beside the torch path's in the same dtype, printed once
    yield
    rep = request.config.pluginmanager.getplugin("terminalreporter")
    cap = request.config.pluginmanager.getplugin("capturemanager")
    if rep is not None and cap is not None and HALF_REPORT:
        with cap.global_and_fixture_disabled():
            rep.write_line("\nlow-precision errors vs float64 (relative to max entry): triton | torch same dtype")
            for what, dt, e, et in HALF_REPORT:
                fmt = lambda x: " ".join(f"{v:.1e}" for v in (x if isinstance(x, tuple) else (x,)))  # noqa: E731
                rep.write_line(f"  {dt:14s} {what:40s} {fmt(e):18s} | {fmt(et)}")


@pytest.mark.parametrize("case", [CASES[0], CASES[-2]], ids=_ids)
def test_triton_backend_float16_step(case, oracle_cache):
    # the whole step in float16 (the interpreter runs float16): JVP and dense Jacobian against the float64 oracle
    # of the same float16-rounded model and state, beside backend="torch" in float16
    if torch.float16 not in tb.SUPPORTED_DTYPES:
        pytest.fail("fastjac/backends/triton.py SUPPORTED_DTYPES does not admit float16")
    name, c = case
    m, X, C = make(name, c, 2, True)
    m16, X16, C16 = copy.deepcopy(m).half(), X.half(), C.half()
    m64, X64, C64 = copy.deepcopy(m16).double(), X16.double(), C16.double()
    J = oracle_jacobian(m64, X64, C64)
    Tk = _rand(3, *X.shape, seed=8).half()
    errs = {}
    for be in ("triton", "torch"):
        dev = DEV if be == "triton" else "cpu"
        mm = copy.deepcopy(m16).to(dev)
        _, JT = fj.jvp(mm, X16.to(dev), Tk.to(dev), C=C16.to(dev), backend=be)
        Jd = fj.jacobian(mm, X16.to(dev), C=C16.to(dev), backend=be)
        errs[be] = (rel(JT.cpu().double(), apply_dense(J, Tk.double(), X64)), rel(Jd.cpu().double(), J))
    HALF_REPORT.append((f"step {name} jvp, dense", "torch.float16", errs["triton"], errs["torch"]))
    for a, b in zip(errs["triton"], errs["torch"]):
        assert a < 2e-2 and a <= max(2 * b, 1e-3), errs


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
    be = backends.get("triton")
    m = fj.ItrSA(8, 2)
    X = torch.randn(1, 3, 8)
    assert "no triton kernels are registered for function" in be.why_not(lambda x: x, X)
    if tb.interpreter_on():  # bfloat16 is refused under the interpreter only (numpy has no bfloat16)
        assert "the Triton interpreter has no bfloat16" in be.why_not(m.bfloat16(), X.bfloat16())
        with pytest.raises(ValueError, match="'triton' cannot handle this input: dtype torch.bfloat16"):
            fj.jvp(m.bfloat16(), X.bfloat16()[0], X.bfloat16()[0], backend="triton")
    else:
        assert torch.bfloat16 in tb.SUPPORTED_DTYPES and torch.float16 in tb.SUPPORTED_DTYPES
    if X.device.type != "cuda" and tb.interpreter_on():
        assert be.why_not(fj.ItrSA(8, 2).half(), X.half()) is None  # float16 runs in the interpreter
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
