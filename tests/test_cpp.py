"""The compiled C++ backend (backend="cpp") against the float64 torch.func oracle, its ops under opcheck, "auto"'s
policy, and the Lyapunov known-exponent tests through it.

The first test builds the extension (csrc/, just in time against the installed torch; about a minute on a 2-core
machine, then cached): a checkout whose build is broken fails here. Without a compiler or ninja the module is
skipped, saying why.

Tolerances. float64: the kernels evaluate the oracle's sums in another order (the q-dot half of the logit tangent
folded into M_i, BLAS blocking), so they agree to a few ulps times the number of terms: 1e-10 relative to the
result's max entry (observed ~1e-15). float32: unit roundoff 6e-8 grown by sums over S keys and D features:
3e-5 relative, and at most 2x the error of the torch backend in float32 (flash-attention's rule), with a 1e-6
floor for results exact in both (observed ~5e-7).
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from oracle import apply_dense, apply_dense_t, oracle_jacobian, randomize_
from test_foundation import CASES, _ids, make, rel

import fastjac as fj
from fastjac import backends
from fastjac.backends import cpp as cppb

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 3e-5}

_why = cppb.toolchain_why_not()
if _why is not None and not cppb.is_built():
    pytest.skip(f"the C++ extension cannot be built here: {_why}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    t0 = time.perf_counter()
    path = cppb.load()  # builds on a fresh checkout: a failing build fails the test module
    return path, time.perf_counter() - t0


def _rand(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def test_extension_builds_and_registers_the_ops(built):
    path, secs = built
    assert cppb.is_loaded() and cppb.is_built() and path.endswith(".so")
    for op in ("attn_jvp", "norm_residual_jvp", "step_dense_"):
        assert hasattr(torch.ops.fastjac, op)
    assert "cpp" in backends.available()


# ---------------------------------------------------------------------------------- the whole step, every option


@pytest.fixture(scope="module")
def oracle_cache():
    return {}


def _setup(cache, name, c, dtype, batch=2):
    key = (name, str(c), batch)
    if key not in cache:
        m, X, C = make(name, c, batch, True)
        cache[key] = (m, X, C, oracle_jacobian(m, X, C))
    m, X, C, J = cache[key]
    return copy.deepcopy(m).to(dtype), X.to(dtype), C.to(dtype), J


def _errors(m, X, C, J, T1, Tk, backend):
    """Relative errors of forward, k-tangent JVP, reused jvp_fn (k and 1 tangents), VJP and NaN-poisoned dense."""
    X64 = X.double()
    Y, JTk = fj.jvp(m, X, Tk, C=C, backend=backend)
    _, f = fj.linearize(m, X, C=C, backend=backend)
    _, vf = fj.vjp(m, X, C=C, backend=backend)
    lin = backends.select(m, X, backend).linearize(m, X, C, True)
    out = torch.full((X.shape[0],) + J.shape[1:], float("nan"), dtype=X.dtype)
    Jd = lin.dense(out=out)
    assert Jd is out and JTk.shape == Tk.shape and vf(Tk).shape == Tk.shape
    assert Y.dtype == JTk.dtype == Jd.dtype == X.dtype
    with torch.no_grad():
        Y_ref = copy.deepcopy(m).double()(X64, C.double())
    d = lambda t: t.double()  # noqa: E731
    return [
        rel(d(Y), Y_ref),
        rel(d(JTk), apply_dense(J, Tk.double(), X64)),
        rel(d(f(Tk)), apply_dense(J, Tk.double(), X64)),
        rel(d(f(T1)), apply_dense(J, T1.double(), X64)),
        rel(d(vf(Tk)), apply_dense_t(J, Tk.double(), X64)),
        rel(d(Jd), J),
    ]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpp_backend_against_oracle(case, dtype, oracle_cache):
    name, c = case
    m, X, C, J = _setup(oracle_cache, name, c, dtype)
    T1 = _rand(*X.shape, dtype=dtype, seed=7)
    Tk = _rand(5, *X.shape, dtype=dtype, seed=8)
    errs = _errors(m, X, C, J, T1, Tk, "cpp")
    assert max(errs) < TOL[dtype], errs
    if dtype == F32:
        errs_torch = _errors(m, X, C, J, T1, Tk, "torch")
        for e_fast, e_ref in zip(errs, errs_torch):
            assert e_fast <= max(2 * e_ref, 1e-6), (errs, errs_torch)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[-2]], ids=_ids)
def test_unbatched_single_tangent_and_no_input(case):
    name, c = case
    m, X, _ = make(name, c, 0, False)
    J = oracle_jacobian(m, X)
    T = _rand(*X.shape, seed=3)
    Y, JT = fj.jvp(m, X, T, backend="cpp")
    assert Y.shape == JT.shape == X.shape and rel(JT, apply_dense(J, T, X)) < 1e-10
    assert rel(fj.jacobian(m, X, backend="cpp"), J) < 1e-10


def test_larger_sizes_match_torch_backend():
    # S = 100 > one query block at k = 5 in float64 (several blocks per head), causal and not, D not a power of 2
    for causal in (False, True):
        m = randomize_(fj.ItrSA(40, 4, norm="layer", norm_group=20, causal=causal, bias=True, dtype=F64), seed=4)
        X, C = _rand(2, 100, 40, seed=1), _rand(2, 100, 40, seed=2)
        T = _rand(5, 2, 100, 40, seed=3)
        ref = fj.jvp(m, X, T, C=C, backend="torch")[1]
        assert rel(fj.jvp(m, X, T, C=C, backend="cpp")[1], ref) < 1e-10
    m = randomize_(fj.ItrSA(12, 3, norm="rms", dtype=F64), seed=5)
    X = _rand(1, 100, 12, seed=6)
    assert rel(fj.jacobian(m, X, backend="cpp"), fj.jacobian(m, X, backend="torch")) < 1e-10


def test_dense_row_chunks(monkeypatch, oracle_cache):
    import fastjac.ops.step.cpp as step_cpp

    name, c = CASES[2]  # S = 33, causal LayerNorm
    m, X, C, J = _setup(oracle_cache, name, c, F64)
    monkeypatch.setattr(step_cpp, "DENSE_FACTOR_BYTES", 1)  # one token row per call of the writer
    out = torch.full_like(J, float("nan"))
    lin = backends.select(m, X, "cpp").linearize(m, X, C, True)
    assert lin.dense(out=out) is out and rel(out, J) < 1e-10


def test_linearize_runs_the_forward_once(monkeypatch):
    import fastjac.ops.step.cpp as step_cpp  # the cpp path's forward is the flash forward (no msa_cache)

    m, X, C = make("ItrSA", CASES[0][1], 2, True)
    calls = []
    real = step_cpp.msa_forward_cpp
    monkeypatch.setattr(step_cpp, "msa_forward_cpp", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, f = fj.linearize(m, X, C=C, backend="cpp")
    T = _rand(3, *X.shape, seed=2)
    first = f(T)
    for _ in range(3):
        torch.testing.assert_close(f(T), first, rtol=0, atol=0)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------ the ops alone


def _attn_inputs(dtype, B=2, H=3, S=9, dh=5, dv=7, K=4, causal=False):
    from fastjac.ops.attention.ref import attention_probs

    q, k = _rand(B, H, S, dh, dtype=dtype, seed=1), _rand(B, H, S, dh, dtype=dtype, seed=2)
    v = _rand(B, H, S, dv, dtype=dtype, seed=3)
    A = attention_probs(q, k, 0.6, causal)
    o = A @ v
    P = _rand(K, B, S, H, 2 * dh + dv, dtype=dtype, seed=4).permute(0, 1, 3, 2, 4)  # strided, as msa_jvp_cpp
    return A, q, k, v, o, P[..., :dh], P[..., dh : 2 * dh], P[..., 2 * dh :]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True])
def test_attn_jvp_op_against_torch_func(dtype, causal):
    from fastjac.ops.attention.ref import attention_probs

    A, q, k, v, o, qd, kd, vd = _attn_inputs(dtype, causal=causal)
    f = lambda a, b, c: attention_probs(a, b, 0.6, causal) @ c  # noqa: E731
    d = lambda t: t.double()  # noqa: E731
    ref = torch.stack(
        [torch.func.jvp(f, (d(q), d(k), d(v)), (d(qd[t]), d(kd[t]), d(vd[t])))[1] for t in range(qd.shape[0])]
    )  # [K, B, H, S, dv]
    od = torch.ops.fastjac.attn_jvp(A, q, k, v, o, qd, kd, vd, 0.6, causal)  # [K, B, S, H, dv]
    assert od.dtype == dtype and rel(od.permute(0, 1, 3, 2, 4).double(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_opcheck_attn_jvp(dtype):
    for causal in (False, True):
        torch.library.opcheck(torch.ops.fastjac.attn_jvp.default, _attn_inputs(dtype, causal=causal) + (0.6, causal))


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
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_norm_residual_jvp_op(kind, group, gamma, dtype):
    from fastjac.ops.norm import NormParams, norm_cache, norm_forward
    from fastjac.ops.norm.cpp import norm_residual_jvp_cpp

    D = 15 if group == 5 else 12
    B, S, K = 2, 7, 3
    g = _rand(D, seed=1) if gamma else None
    p = NormParams(kind, g, None, 1e-3, group)
    Z, T, R = _rand(B, S, D, seed=2), _rand(K, B, S, D, seed=3), _rand(K, B, S, D, seed=4)
    ref = torch.stack([torch.func.jvp(lambda z: norm_forward(z, p), (Z,), (T[t] + 0.7 * R[t],))[1] for t in range(K)])
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    c = norm_cache(cast(Z), NormParams(kind, cast(g), None, 1e-3, group))
    y = norm_residual_jvp_cpp(c, cast(T), cast(R), 0.7)
    assert y.dtype == dtype and rel(y.double(), ref) < TOL[dtype]
    args = (cast(T), cast(R), c.w, c.s, cast(g), torch.tensor(0.7, dtype=dtype), kind, group)
    torch.library.opcheck(torch.ops.fastjac.norm_residual_jvp.default, args)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_opcheck_step_dense(dtype):
    from fastjac.ops.step.cpp import dense_factors

    m = randomize_(fj.ItrSA(10, 2, norm="l2", norm_group=5, dtype=F64), seed=1).to(dtype)
    X = _rand(1, 6, 10, dtype=dtype, seed=2)
    lin = backends.get("cpp").linearize(m, X, None, True)
    out = torch.full((60, 60), float("nan"), dtype=dtype)
    args = dense_factors(lin, 0, 2, 5)
    torch.library.opcheck(torch.ops.fastjac.step_dense_.default, args + (out, 2))
    torch.ops.fastjac.step_dense_(*args, out, 2)
    ref = fj.jacobian(m, X[0], backend="torch")
    assert rel(out[20:50], ref[20:50]) < TOL[dtype] and torch.isnan(out[:20]).all()


def test_ops_trace_under_torch_compile():
    A, q, k, v, o, qd, kd, vd = _attn_inputs(F32)
    f = torch.compile(lambda *a: torch.ops.fastjac.attn_jvp(*a, 0.6, False) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        f(A, q, k, v, o, qd, kd, vd), 2 * torch.ops.fastjac.attn_jvp(A, q, k, v, o, qd, kd, vd, 0.6, False)
    )


def test_ops_reject_bad_input_naming_the_argument():
    A, q, k, v, o, qd, kd, vd = _attn_inputs(F64)
    with pytest.raises(RuntimeError, match="kd: expected shape"):
        torch.ops.fastjac.attn_jvp(A, q, k, v, o, qd, kd[..., :3], vd, 0.6, False)
    with pytest.raises(RuntimeError, match="v: expected dtype"):
        torch.ops.fastjac.attn_jvp(A, q, k, v.float(), o, qd, kd, vd, 0.6, False)
    with pytest.raises(RuntimeError, match="A: expected"):
        torch.ops.fastjac.attn_jvp(A[..., :4], q, k, v, o, qd, kd, vd, 0.6, False)
    with pytest.raises(RuntimeError, match="A: expected float32 or float64"):
        torch.ops.fastjac.attn_jvp(
            A.half(), q.half(), k.half(), v.half(), o.half(), qd.half(), kd.half(), vd.half(), 0.6, False
        )
    T = torch.randn(2, 1, 3, 6, dtype=F64)
    with pytest.raises(RuntimeError, match="kind: expected"):
        torch.ops.fastjac.norm_residual_jvp(T, T, None, None, None, torch.tensor(1.0), "batch", 3)
    with pytest.raises(RuntimeError, match="w, s: required"):
        torch.ops.fastjac.norm_residual_jvp(T, T, None, None, None, torch.tensor(1.0), "l2", 3)
    with pytest.raises(RuntimeError, match="group: must divide"):
        torch.ops.fastjac.norm_residual_jvp(T, T, None, None, None, torch.tensor(1.0), "none", 4)
    out = torch.empty(10, 10, dtype=F64)
    with pytest.raises(RuntimeError, match="i0: rows"):
        torch.ops.fastjac.step_dense_(
            torch.zeros(1, 2, 2, dtype=F64),
            torch.zeros(2, 1, 5, 5, dtype=F64),
            torch.zeros(1, 2, 2, 5, dtype=F64),
            torch.zeros(2, 1, 5, dtype=F64),
            torch.zeros(2, 5, 5, dtype=F64),
            out,
            1,
        )


# ------------------------------------------------------------------------------------------- "auto", fj.info


def test_auto_picks_cpp_without_grad_and_declines_with_grad():
    m = fj.ItrSA(8, 2)
    X = torch.randn(3, 8)
    s = fj.info(m, X)  # parameters require grad and grad mode is on: gradients could be wanted
    assert s.startswith("backend='auto' -> torch") and "cpp: gradients may be wanted" in s
    with torch.no_grad():
        assert fj.info(m, X).startswith("backend='auto' -> cpp")
    m.requires_grad_(False)
    assert fj.info(m, X).startswith("backend='auto' -> cpp")
    assert not fj.info(m, X.requires_grad_()).startswith("backend='auto' -> cpp")
    assert "cpp: X is on meta" in backends.explain(m, torch.zeros(1, 3, 8, device="meta"))
    assert "float32 or float64" in backends.get("cpp").why_not(m.bfloat16(), torch.zeros(1, 3, 8).bfloat16())
    assert "no cpp kernels are registered" in backends.get("cpp").why_not(lambda x: x, X[None])


def test_auto_never_compiles(monkeypatch, tmp_path):
    be = backends.get("cpp")
    m = fj.ItrSA(8, 2).requires_grad_(False)
    monkeypatch.setattr(cppb, "_loaded", None)
    monkeypatch.setattr(cppb, "_lib_file", lambda: tmp_path / "missing.so")
    monkeypatch.setattr(cppb, "load", lambda *a, **k: pytest.fail("auto must not build"))
    assert "not built yet" in be.auto_why_not(m, torch.zeros(1, 3, 8)) and "python -m fastjac build" in be.auto_why_not(
        m, torch.zeros(1, 3, 8)
    )
    assert be.why_not(m, torch.zeros(1, 3, 8)) is None  # by name it would build
    monkeypatch.setattr(cppb, "toolchain_why_not", lambda: "no C++ compiler found (test)")
    assert "cannot be built: no C++ compiler found" in be.why_not(m, torch.zeros(1, 3, 8))


def test_build_command_finds_the_cached_build(capsys):
    assert cppb.main([]) == 0
    assert "C++ extension" in capsys.readouterr().out
    assert cppb.build_info().get("compile_s", 0) > 0


# ---------------------------------------------------------------------------------- Lyapunov through backend="cpp"


@pytest.mark.filterwarnings("ignore:lyapunov_spectrum. the state grew")
def test_lyapunov_uniform_attention_is_affine_through_cpp():
    # as tests/test_lyapunov.py: beta = 0, no normalisation, so the step is affine with known exponents
    S, D, eta = 5, 6, 0.3
    m = fj.ItrSA(D, 2, norm="none", beta=0.0, eta=eta, dtype=F64)
    randomize_(m, seed=3)
    with torch.no_grad():
        m.eta.fill_(eta)
    M = sum((m.wv[h] @ m.wo[h]).T for h in range(2))
    mean_mode = [math.log(abs(1 + eta * z)) for z in torch.linalg.eigvals(M).tolist()]
    expected = sorted(mean_mode + [0.0] * ((S - 1) * D), reverse=True)
    steps = 300
    g = torch.Generator().manual_seed(0)
    res = fj.lyapunov_spectrum(
        m,
        torch.randn(S, D, generator=g, dtype=F64),
        C=torch.randn(S, D, generator=g, dtype=F64),
        steps=steps,
        progress=False,
        backend="cpp",
    )
    torch.testing.assert_close(res.exponents, torch.tensor(expected, dtype=F64), rtol=0, atol=10 / steps)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 2e-4)])
def test_lyapunov_cpp_gives_the_torch_exponents(dtype, tol):
    m = randomize_(fj.ItrSA(12, 3, norm="rms", causal=True, dtype=F64), seed=9).to(dtype)
    X0 = _rand(2, 7, 12, seed=1).to(dtype)
    common = dict(k=5, steps=8, burn_in=1, progress=False)
    ref = fj.lyapunov_spectrum(m, X0, backend="torch", **common)
    fast = fj.lyapunov_spectrum(m, X0, backend="cpp", **common)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=tol)
    a = randomize_(fj.AKOrN(12, 2, osc_dim=3, dtype=F64), seed=2).to(dtype)
    Xa = a.project(_rand(5, 12, seed=3).to(dtype))
    ref = fj.lyapunov_spectrum(a, Xa, backend="torch", **common)
    fast = fj.lyapunov_spectrum(a, Xa, backend="cpp", **common)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=tol)
