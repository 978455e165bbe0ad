"""Every backend against the float64 torch.func oracle: forward, JVP (1 and k tangents), VJP, dense Jacobian.

Tolerances. float64: the analytic and autograd paths evaluate the same sums in different orders, so they agree to
a few ulps times the number of terms (S*D <= ~600 here): 1e-10 relative to the result's max entry, observed ~1e-14.
float32: unit roundoff 6e-8 grown by sums over S keys and D features (~100 terms each, two contractions): 3e-5
relative; in addition the analytic path may be at most 2x worse than torch.func on the same float32 forward
(flash-attention's rule), with a 1e-6 floor for results that are exact in both.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import apply_dense, apply_dense_t, oracle_jacobian, randomize_, reference_step

import fastjac as fj

F64 = torch.float64

# Each option value of docs/design.md section 1 appears at least once; S in {1, 7, 33}, D never a power of two.
ITRSA_CASES = [
    dict(S=7, D=12, H=3, kw=dict(norm="l2")),
    dict(S=1, D=12, H=1, kw=dict(norm="rms", bias=True)),
    dict(S=33, D=10, H=1, kw=dict(norm="layer", causal=True)),
    dict(S=7, D=18, H=3, kw=dict(norm="none", out_proj=False)),
    dict(S=7, D=12, H=3, kw=dict(norm="l2", norm_group=4, bias=True, causal=True, head_dim=5, value_dim=7)),
    dict(S=33, D=6, H=3, kw=dict(norm="rms", norm_group=3, out_proj=False, bias=True)),
    dict(S=7, D=15, H=3, kw=dict(norm="layer", norm_group=5, bias=True, head_dim=2, beta=0.7)),
    dict(S=1, D=9, H=3, kw=dict(norm="none", causal=True, bias=True)),
]
AKORN_CASES = [
    dict(S=7, D=12, H=3, kw=dict(osc_dim=4)),
    dict(S=1, D=6, H=1, kw=dict(osc_dim=2, bias=True)),
    dict(S=33, D=6, H=3, kw=dict(osc_dim=3, causal=True, out_proj=False)),
    dict(S=7, D=10, H=1, kw=dict(osc_dim=5, bias=True, causal=True, head_dim=3, value_dim=4, beta=0.4)),
]
CASES = [("ItrSA", c) for c in ITRSA_CASES] + [("AKOrN", c) for c in AKORN_CASES]


def _ids(case):
    name, c = case
    return f"{name}-S{c['S']}-D{c['D']}-H{c['H']}-" + "-".join(f"{k}={v}" for k, v in c["kw"].items())


def make(name, c, batch, with_C, dtype=F64, seed=0):
    cls = fj.ItrSA if name == "ItrSA" else fj.AKOrN
    m = randomize_(cls(c["D"], c["H"], dtype=F64, **c["kw"]), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (batch, c["S"], c["D"]) if batch else (c["S"], c["D"])
    X = torch.randn(shape, generator=g, dtype=F64)
    if name == "AKOrN":
        X = m.project(X)
    C = torch.randn(shape, generator=g, dtype=F64) if with_C else None
    return m.to(dtype), X.to(dtype), None if C is None else C.to(dtype)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def oracle_cache():
    return {}


def _oracle(cache, name, c, batch, with_C):
    key = (name, str(c), batch, with_C)
    if key not in cache:
        m, X, C = make(name, c, batch, with_C)
        cache[key] = (m, X, C, oracle_jacobian(m, X, C))
    return cache[key]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_independent_reference(case):
    name, c = case
    for batch in (0, 2):
        m, X, C = make(name, c, batch, with_C=True)
        torch.testing.assert_close(m(X, C), reference_step(m, X, C), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m(X), reference_step(m, X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "autograd"])
@pytest.mark.parametrize("batch,with_C", [(0, True), (3, False), (2, True)])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float64_against_oracle(case, batch, with_C, backend, oracle_cache):
    name, c = case
    m, X, C, J = _oracle(oracle_cache, name, c, batch, with_C)
    g = torch.Generator().manual_seed(7)
    T1 = torch.randn(X.shape, generator=g, dtype=F64)
    Tk = torch.randn((5,) + X.shape, generator=g, dtype=F64)

    Y, JT = fj.jvp(m, X, T1, C=C, backend=backend)
    assert Y.shape == X.shape and JT.shape == X.shape
    torch.testing.assert_close(Y, m(X, C), rtol=0, atol=0)
    assert rel(JT, apply_dense(J, T1, X)) < 1e-10
    _, JTk = fj.jvp(m, X, Tk, C=C, backend=backend)
    assert JTk.shape == Tk.shape and rel(JTk, apply_dense(J, Tk, X)) < 1e-10

    _, f = fj.linearize(m, X, C=C, backend=backend)
    assert rel(f(Tk), apply_dense(J, Tk, X)) < 1e-10 and rel(f(T1), apply_dense(J, T1, X)) < 1e-10

    _, vf = fj.vjp(m, X, C=C, backend=backend)
    assert rel(vf(T1), apply_dense_t(J, T1, X)) < 1e-10
    assert vf(Tk).shape == Tk.shape and rel(vf(Tk), apply_dense_t(J, Tk, X)) < 1e-10

    Jd = fj.jacobian(m, X, C=C, backend=backend)
    assert Jd.shape == J.shape and rel(Jd, J) < 1e-10


@pytest.mark.parametrize("case", CASES[:3] + CASES[-2:], ids=_ids)
def test_float32_within_stated_tolerance(case, oracle_cache):
    name, c = case
    m, X, C, J = _oracle(oracle_cache, name, c, 2, True)
    m32, X32, C32 = copy.deepcopy(m).float(), X.float(), C.float()
    T = torch.randn((3,) + X.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref_jvp, ref_vjp = apply_dense(J, T, X), apply_dense_t(J, T, X)
    errs = {}
    for be in ("torch", "autograd"):
        _, JT = fj.jvp(m32, X32, T.float(), C=C32, backend=be)
        _, vf = fj.vjp(m32, X32, C=C32, backend=be)
        Jd = fj.jacobian(m32, X32, C=C32, backend=be)
        assert JT.dtype == vf(T.float()).dtype == Jd.dtype == torch.float32
        errs[be] = [rel(JT.double(), ref_jvp), rel(vf(T.float()).double(), ref_vjp), rel(Jd.double(), J)]
    for e_fast, e_ag in zip(errs["torch"], errs["autograd"]):
        assert e_fast < 3e-5
        assert e_fast <= max(2 * e_ag, 1e-6), errs


def test_nan_poisoned_output_is_fully_written(oracle_cache):
    name, c = CASES[4]
    m, X, C, J = _oracle(oracle_cache, name, c, 2, True)
    lin = m.linearize_analytic(X, C)
    out = torch.full_like(J, float("nan"))
    lin.dense(out=out)
    assert torch.isfinite(out).all() and rel(out, J) < 1e-10


def test_dense_row_chunks_agree(monkeypatch, oracle_cache):
    import fastjac.ops.step.ref as step_ref

    name, c = CASES[2]
    m, X, C, J = _oracle(oracle_cache, name, c, 2, True)
    monkeypatch.setattr(step_ref, "DENSE_CHUNK_BYTES", 1)  # one token row per chunk
    assert rel(fj.jacobian(m, X, C=C, backend="torch"), J) < 1e-10


def test_generic_callable_autograd_path():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=F64) / 3
    step = lambda X: torch.tanh(X @ W) + 0.1 * X.mean(-2, keepdim=True)  # noqa: E731 (couples tokens)
    X = torch.randn(4, 5, 6, generator=g, dtype=F64)
    J = oracle_jacobian(step, X)
    assert rel(fj.jacobian(step, X), J) < 1e-12
    T = torch.randn(3, 4, 5, 6, generator=g, dtype=F64)
    assert rel(fj.jvp(step, X, T)[1], apply_dense(J, T, X)) < 1e-12
    assert rel(fj.vjp(step, X)[1](T), apply_dense_t(J, T, X)) < 1e-12
    assert "autograd" in fj.info(step, X).split("->")[1]
    # a step taking C as its second argument
    C = torch.randn(5, 6, generator=g, dtype=F64)
    stepc = lambda X, C: step(X) + C  # noqa: E731
    assert rel(fj.jacobian(stepc, X[0], C=C), J[0]) < 1e-12


def test_auto_picks_torch_for_models_and_explains():
    m = fj.ItrSA(8, 2)
    s = fj.info(m, torch.randn(3, 8))
    assert s.startswith("backend='auto' -> torch") and "autograd: ok" in s


def test_analytic_path_is_differentiable_in_the_weights():
    # Jacobian-based regularisers backpropagate through the torch backend to the parameters
    m, X, C = make("ItrSA", ITRSA_CASES[4], 2, True)
    T = torch.randn((2,) + X.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = {}
    for be in ("torch", "autograd"):
        m.zero_grad()
        _, JT = fj.jvp(m, X, T, C=C, backend=be)
        (JT**2).sum().backward()
        grads[be] = {n: p.grad.clone() for n, p in m.named_parameters()}
    # bk only shifts every logit of a row by q_i.bk, which softmax ignores: its gradient is 0 up to roundoff, so
    # errors are measured against the largest gradient entry of all parameters
    scale = max(g.abs().max().item() for g in grads["autograd"].values())
    for n in grads["torch"]:
        assert (grads["torch"][n] - grads["autograd"][n]).abs().max().item() < 1e-10 * scale, n


def test_unroll_and_unbatched_equal_batched():
    m, X, C = make("ItrSA", ITRSA_CASES[0], 3, True)
    traj = m.unroll(X, C, steps=4)
    assert traj.shape == (5,) + X.shape
    torch.testing.assert_close(traj[0], X)
    torch.testing.assert_close(traj[2], m(m(X, C), C))
    J = fj.jacobian(m, X, C=C)
    torch.testing.assert_close(fj.jacobian(m, X[1], C=C[1]), J[1], rtol=1e-12, atol=1e-12)


def test_shared_input_broadcasts_over_batch():
    m, X, _ = make("AKOrN", AKORN_CASES[0], 3, False)
    C = torch.randn(X.shape[1:], dtype=F64)
    J = fj.jacobian(m, X, C=C)
    torch.testing.assert_close(J, oracle_jacobian(m, X, C), rtol=1e-10, atol=1e-12)


def test_norm_jacobian_blocks_match_autograd():
    from fastjac.ops import NormParams, norm_cache, norm_jacobian_blocks

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2, 3, 6, generator=g, dtype=F64)
    for kind in ("l2", "rms", "layer", "none"):
        p = NormParams(kind, torch.randn(6, generator=g, dtype=F64), None, 1e-3, 3)
        blocks = norm_jacobian_blocks(norm_cache(Z, p))
        f = lambda z: norm_cache(z.unsqueeze(0).unsqueeze(0), p).out[0, 0]  # noqa: E731
        for b in range(2):
            for i in range(3):
                torch.testing.assert_close(blocks[b, i], torch.func.jacrev(f)(Z[b, i]), rtol=1e-12, atol=1e-12)


def test_primitive_ops_reachable():
    for name in (
        "msa_forward",
        "msa_jvp",
        "msa_vjp",
        "msa_jacobian_rows",
        "norm_forward",
        "norm_jvp",
        "norm_vjp",
        "norm_jacobian_blocks",
        "proj_forward",
        "proj_jvp",
        "proj_vjp",
        "omega_apply",
        "omega_vjp",
    ):
        assert callable(getattr(fj.ops, name))


def test_dense_jacobian_is_differentiable_in_the_weights():
    for name, case in (("ItrSA", ITRSA_CASES[6]), ("AKOrN", AKORN_CASES[3])):
        m, X, C = make(name, case, 2, True)
        grads = {}
        for be in ("torch", "autograd"):
            m.zero_grad()
            (fj.jacobian(m, X, C=C, backend=be, create_graph=True) ** 2).sum().backward()
            # LayerNorm's bias shifts the output only: it does not reach the Jacobian (grad None in both paths)
            grads[be] = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
        scale = max(g.abs().max().item() for g in grads["autograd"].values())
        for n in grads["torch"]:
            assert (grads["torch"][n] - grads["autograd"][n]).abs().max().item() < 1e-10 * scale, (name, n)
