"""The C++ flash attention ops (fastjac.ops.attention.cpp: flash_forward, flash_jvp) against a float64 oracle.

The oracle is attention written out with an explicit softmax in float64, its tangents by torch.func.jvp. Covered:
L != S, an additive bias (full, broadcast as an expanded view, transposed storage, with -inf entries), causal (top-left aligned, also
for L != S), fully masked rows (o = 0, lse = -inf, od = 0, never NaN), tiles that do not divide S (S in
{1, 7, 65, 129} with tiny forced tiles, and the default tiles), K in {1, 5}, float32 and float64, opcheck, and
that the cpp model path allocates no [S, S] buffer at S = 8192 (largest tensor at the dispatcher, and the
process's peak RSS).

Tolerances as tests/test_cpp.py: float64 1e-10 relative to the result's max entry (observed ~1e-15); float32
3e-5 (observed ~1e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastjac.backends import cpp as cppb

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 3e-5}
ROOT = Path(__file__).resolve().parent.parent

_why = cppb.toolchain_why_not()
if _why is not None and not cppb.is_built():
    pytest.skip(f"the C++ extension cannot be built here: {_why}", allow_module_level=True)

from fastjac.ops.attention.cpp import flash_available, flash_forward, flash_jvp  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def built():
    return cppb.load()


def _rand(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def oracle(q, k, v, scale, causal, bias):
    """float64 attention with the softmax written out; fully masked rows give o = 0 and lse = -inf."""
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    p = torch.where(z > 0, e / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(e))
    lse = torch.where(z[..., 0] > 0, (m + torch.log(z))[..., 0], torch.full_like(z[..., 0], float("-inf")))
    return p @ v, lse


def _inputs(B, H, L, S, E, Ev, K, dtype, bias_kind, seed=0):
    q, k, v = (_rand(B, H, L, E, seed=seed + 1), _rand(B, H, S, E, seed=seed + 2), _rand(B, H, S, Ev, seed=seed + 3))
    T = [_rand(K, *t.shape, seed=seed + 4 + i) for i, t in enumerate((q, k, v))]
    bias = None
    if bias_kind == "full":
        bias = _rand(B, H, L, S, seed=seed + 9)
        bias[..., ::3] = float("-inf")  # masked keys
        if L > 1:
            bias[:, :, 1, :] = float("-inf")  # a fully masked row
    elif bias_kind == "broadcast":  # [B, 1, 1, S] expanded: zero strides, read in place
        bias = _rand(B, 1, 1, S, seed=seed + 9).expand(B, H, L, S)
    elif bias_kind == "strided":  # [L, S] stored transposed (key stride L), broadcast over B and H
        bias = _rand(S, L, seed=seed + 9).t()
        bias[:, ::4] = float("-inf")
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (q, k, v)], [cast(t) for t in T], cast(bias)


def _check(B, H, L, S, E, Ev, K, dtype, causal, bias_kind, tiles):
    (q, k, v), (qd, kd, vd), bias = _inputs(B, H, L, S, E, Ev, K, dtype, bias_kind)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    o_ref, lse_ref = oracle(d(q), d(k), d(v), 0.7, causal, d(bias))
    f = lambda a, b, c: oracle(a, b, c, 0.7, causal, d(bias))[0]  # noqa: E731
    od_ref = torch.stack([torch.func.jvp(f, (d(q), d(k), d(v)), (d(qd[t]), d(kd[t]), d(vd[t])))[1] for t in range(K)])
    bm, bn = tiles
    o, lse = flash_forward(q, k, v, scale=0.7, causal=causal, bias=bias, block_m=bm, block_n=bn)
    od = flash_jvp(q, k, v, o, lse, qd, kd, vd, scale=0.7, causal=causal, bias=bias, block_m=bm, block_n=bn)
    assert o.shape == (B, H, L, Ev) and lse.shape == (B, H, L) and od.shape == (K, B, H, L, Ev)
    assert o.dtype == lse.dtype == od.dtype == dtype
    assert not o.isnan().any() and not od.isnan().any() and not lse.isnan().any()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin)  # -inf exactly on the fully masked rows
    assert (o[~fin] == 0).all() and (od[:, ~fin] == 0).all()
    assert rel(o.double(), o_ref) < TOL[dtype]
    if fin.any():
        assert rel(lse.double()[fin], lse_ref[fin]) < TOL[dtype]
    assert rel(od.double(), od_ref) < TOL[dtype], rel(od.double(), od_ref)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("S", [1, 7, 65, 129])
@pytest.mark.parametrize("tiles", [(1, 1), (3, 5), (16, 8), (0, 0)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
def test_flash_ragged_tiles(S, tiles, dtype):
    # tiles that do not divide S, L != S (L = S + 2 and a shorter one), both K, causal and not
    for causal in (False, True):
        _check(1, 2, S + 2, S, 5, 3, 5, dtype, causal, None, tiles)
    _check(2, 1, max(1, S // 2), S, 4, 6, 1, dtype, False, None, tiles)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias_kind", ["full", "broadcast", "strided"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_bias_and_masked_rows(bias_kind, causal, dtype):
    for tiles in ((2, 3), (0, 0)):
        _check(2, 3, 9, 13, 6, 5, 5, dtype, causal, bias_kind, tiles)
        _check(1, 2, 13, 9, 6, 5, 1, dtype, causal, bias_kind, tiles)


def test_all_keys_masked_and_no_keys():
    q, k, v = _rand(1, 1, 4, 3), _rand(1, 1, 5, 3), _rand(1, 1, 5, 2)
    bias = torch.full((5,), float("-inf"), dtype=F64)
    o, lse = flash_forward(q, k, v, scale=1.0, causal=False, bias=bias)
    assert (o == 0).all() and torch.isneginf(lse).all()
    T = lambda t: _rand(2, *t.shape, seed=5)  # noqa: E731
    od = flash_jvp(q, k, v, o, lse, T(q), T(k), T(v), scale=1.0, causal=False, bias=bias)
    assert (od == 0).all()
    o, lse = flash_forward(q, k[:, :, :0], v[:, :, :0], scale=1.0, causal=False)
    assert o.shape == (1, 1, 4, 2) and (o == 0).all() and torch.isneginf(lse).all()


def test_overflow_propagates_as_nan_not_as_a_masked_row():
    # logits overflow to inf: softmax is NaN there, and the NaN must reach o and od (a finite 0 would hide the
    # overflow from the callers' checks, e.g. lyapunov_spectrum's)
    q, k, v = _rand(1, 1, 3, 4) * 1e200, _rand(1, 1, 5, 4) * 1e200, _rand(1, 1, 5, 2)
    o, lse = flash_forward(q, k, v, scale=1.0, causal=False)
    assert o.isnan().any()
    T = lambda t: _rand(2, *t.shape, seed=5)  # noqa: E731
    assert flash_jvp(q, k, v, o, lse, T(q), T(k), T(v), scale=1.0, causal=False).isnan().any()


def test_flash_tiles_from_env(monkeypatch):
    monkeypatch.setenv("FASTJAC_CPP_FLASH_TILES", "2,3")
    _check(1, 2, 11, 11, 4, 4, 5, F64, True, None, (0, 0))
    monkeypatch.setenv("FASTJAC_CPP_FLASH_TILES", "two")
    with pytest.raises(ValueError, match="FASTJAC_CPP_FLASH_TILES"):
        flash_forward(*_inputs(1, 1, 3, 3, 2, 2, 1, F64, None)[0], scale=1.0, causal=False)


def test_flash_accepts_strided_inputs_and_rejects_bad_ones():
    (q, k, v), (qd, kd, vd), _ = _inputs(2, 3, 6, 8, 4, 5, 3, F64, None)
    o, lse = flash_forward(q, k, v, scale=0.5, causal=False)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, E] storage
    o2, lse2 = flash_forward(qt, k, v, scale=0.5, causal=False)
    torch.testing.assert_close(o2, o, rtol=0, atol=1e-14)
    od = flash_jvp(q, k, v, o, lse, qd, kd, vd, scale=0.5, causal=False)
    od2 = flash_jvp(
        q, k, v, o, lse, qd.transpose(-1, -2).contiguous().transpose(-1, -2), kd, vd, scale=0.5, causal=False
    )
    torch.testing.assert_close(od2, od, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="kd: expected"):
        flash_jvp(q, k, v, o, lse, qd, kd[..., :2], vd, scale=0.5, causal=False)
    with pytest.raises(ValueError, match="q: expected a CPU float32/float64"):
        flash_forward(q.half(), k.half(), v.half(), scale=0.5, causal=False)
    with pytest.raises(ValueError, match="k, v: expected q's dtype"):
        flash_forward(q, k.float(), v, scale=0.5, causal=False)
    with pytest.raises(RuntimeError, match="bias: shape"):
        flash_forward(q, k, v, scale=0.5, causal=False, bias=torch.zeros(7, dtype=F64))
    assert flash_available() is None


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_opcheck_flash_ops(dtype):
    (q, k, v), (qd, kd, vd), bias = _inputs(2, 2, 5, 7, 3, 4, 3, dtype, "broadcast")
    for causal in (False, True):
        for b in (None, bias):
            torch.library.opcheck(torch.ops.fastjac.flash_fwd.default, (q, k, v, 0.7, causal, b, 2, 3))
            o, lse = torch.ops.fastjac.flash_fwd(q, k, v, 0.7, causal, b, 2, 3)
            torch.library.opcheck(
                torch.ops.fastjac.flash_jvp.default, (q, k, v, o, lse, qd, kd, vd, 0.7, causal, b, 2, 3)
            )


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import fastjac as fj
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastjac.backends import cpp
    cpp.load(build=False)
    S, D, H, K = 8192, 32, 2, 2
    torch.manual_seed(0)
    m = fj.ItrSA(D, H, norm="l2", dtype=torch.float32).requires_grad_(False)
    X, T = torch.randn(1, S, D), torch.randn(K, 1, S, D)
    largest = [0]

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())
            return out

    with torch.no_grad():
        fj.jvp(m, X[:, :1024], T[:, :, :1024], backend="cpp")  # warm up: threads, BLAS and allocator pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Y, JT = fj.jvp(m, X, T, backend="cpp")
        lin = fj.linearization(m, X, backend="cpp")
        JT2 = lin.jvp(T)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with Largest():  # separately: the mode's own bookkeeping would blur the RSS figure
            fj.jvp(m, X, T, backend="cpp")
            fj.linearization(m, X, backend="cpp").jvp(T)
    assert torch.isfinite(JT).all() and torch.equal(JT, JT2)
    print(largest[0], (after - before) / 1024.0)
""")


def test_no_S_by_S_buffer_at_S_8192():
    # one [S, S] float32 buffer at S = 8192 is 256 MB (512 MB for the two heads); the cpp path needs O(K S D)
    # (observed: largest tensor 1.6 M elements = K S (2 dh + dv) H, peak RSS growth ~30 MB)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-3000:]
    largest, grew_mb = r.stdout.split()[-2:]
    S = 8192
    assert int(largest) < S * S // 16, largest  # the largest tensor at the dispatcher: O(K S D), not S x S
    assert float(grew_mb) < 100, grew_mb  # peak RSS growth (covers the op's own C++ allocations)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_step_dense_flash(dtype, causal):
    from oracle import randomize_

    import fastjac as fj
    from fastjac import backends
    from fastjac.ops.attention.ref import _out_proj_h

    m = randomize_(fj.ItrSA(10, 2, norm="l2", norm_group=5, causal=causal, dtype=F64), seed=1).to(dtype)
    X = _rand(1, 6, 10, dtype=dtype, seed=2)
    lin = backends.get("cpp").linearize(m, X, None, True)
    c, p = lin._fc, lin._fc.params
    L, E = lin._row_factors()
    out = torch.full((1, 60, 60), float("nan"), dtype=dtype)
    args = (
        c.q,
        c.k,
        _out_proj_h(c.v, p.wo),
        _out_proj_h(c.o, p.wo),
        L,
        E,
        (p.wv @ p.wo).transpose(-1, -2),
        p.wq,
        p.wk,
        float(lin.p.eta.detach()),
        float(p.beta),
        causal,
        out,
    )
    torch.library.opcheck(torch.ops.fastjac.step_dense_flash_.default, args)
    torch.ops.fastjac.step_dense_flash_(*args)
    ref = fj.jacobian(m, X[0], backend="torch")
    assert rel(out[0].double(), ref.double()) < TOL[dtype]
