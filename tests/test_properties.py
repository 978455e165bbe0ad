"""Property tests (hypothesis) over shapes and options: the analytic path equals torch.func in float64."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import oracle_jacobian, randomize_

import fastjac as fj

F64 = torch.float64


@st.composite
def itrsa_cases(draw):
    H = draw(st.integers(1, 3))
    N = draw(st.integers(1, 5))
    D = N * draw(st.integers(1, 3))
    kw = dict(
        norm=draw(st.sampled_from(["l2", "rms", "layer", "none"])),
        norm_group=N,
        out_proj=draw(st.booleans()),
        bias=draw(st.booleans()),
        causal=draw(st.booleans()),
        head_dim=draw(st.integers(1, 4)),
        beta=draw(st.floats(0.0, 2.0)),
    )
    if kw["norm"] == "layer" and N == 1:
        kw["norm"] = "l2"  # a one-feature LayerNorm group is constant: its Jacobian is 0, nothing to test
    if kw["out_proj"]:
        kw["value_dim"] = draw(st.integers(1, 4))
    S = draw(st.integers(1, 9))
    B = draw(st.sampled_from([0, 1, 2]))
    return fj.ItrSA(D, H, dtype=F64, **kw), S, B, draw(st.integers(0, 2**16)), draw(st.booleans())


@st.composite
def akorn_cases(draw):
    H, N = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    D = N * draw(st.integers(1, 3))
    m = fj.AKOrN(
        D, H, osc_dim=N, dtype=F64, bias=draw(st.booleans()), causal=draw(st.booleans()), out_proj=draw(st.booleans())
    )
    return m, draw(st.integers(1, 8)), draw(st.sampled_from([0, 2])), draw(st.integers(0, 2**16)), draw(st.booleans())


def _check(case):
    m, S, B, seed, with_C = case
    randomize_(m, seed)
    g = torch.Generator().manual_seed(seed)
    shape = (B, S, m.dim) if B else (S, m.dim)
    X = torch.randn(shape, generator=g, dtype=F64) * 2
    if isinstance(m, fj.AKOrN):
        X = m.project(X)
    C = torch.randn(shape, generator=g, dtype=F64) if with_C else None
    J = oracle_jacobian(m, X, C)
    scale = J.abs().max().clamp_min(1.0)
    Jt = fj.jacobian(m, X, C=C, backend="torch")
    assert ((Jt - J).abs().max() / scale) < 1e-10
    T = torch.randn((3,) + shape, generator=g, dtype=F64)
    JT = fj.jvp(m, X, T, C=C, backend="torch")[1]
    ref = fj.jvp(m, X, T, C=C, backend="autograd")[1]
    assert ((JT - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-10
    GT = fj.vjp(m, X, C=C, backend="torch")[1](T)
    ref = fj.vjp(m, X, C=C, backend="autograd")[1](T)
    assert ((GT - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-10


@settings(max_examples=40, deadline=None)
@given(itrsa_cases())
def test_itrsa_analytic_equals_autograd(case):
    _check(case)


@settings(max_examples=25, deadline=None)
@given(akorn_cases())
def test_akorn_analytic_equals_autograd(case):
    _check(case)
