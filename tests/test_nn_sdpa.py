"""fastjac.nn.functional.scaled_dot_product_attention against a float64 eager oracle (attention written out with
softmax), under every torch.func transform; forward_ad() routing and restoring; the one-call k-tangent rule."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import fastjac.nn.functional as nnf
from fastjac.nn.attention import active, forward_ad
from fastjac.nn.functional import scaled_dot_product_attention as sdpa

D64 = torch.float64
TOL = 1e-12


def oracle(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Attention with an explicit softmax (differentiable in every mode by torch itself)."""
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    s = (1 / math.sqrt(q.shape[-1]) if scale is None else scale) * (q @ k.transpose(-1, -2))
    if is_causal:
        s = s.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, -1) @ v


def _inputs(B=2, Hq=3, Hk=3, L=5, S=7, E=4, Ev=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D64)  # noqa: E731
    return r(B, Hq, L, E), r(B, Hk, S, E), r(B, Hk, S, Ev)


def _mask_bool(B, L, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, 1, L, S, generator=g) > 0.4
    m[..., 0] = True  # no fully masked row here (tested on its own: the oracle gives NaN there)
    return m


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask=_mask_bool(2, 5, 7)),
    "float_mask_LS": dict(attn_mask=torch.randn(5, 7, generator=torch.Generator().manual_seed(2), dtype=D64)),
    "scale": dict(scale=0.37),
}


def _close(a, b, tol=TOL):
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _close(x, y, tol)
        return
    assert a.shape == b.shape
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err < tol, err


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [dict(), dict(L=1, S=1), dict(L=9, S=3, E=5, Ev=2), dict(Hq=4, Hk=2)])
def test_forward_jvp_vmapjvp_jacrev(case, shape):
    kw = dict(CASES[case])
    L, S = shape.get("L", 5), shape.get("S", 7)
    if case == "bool_mask":
        kw["attn_mask"] = _mask_bool(2, L, S)
    elif case == "float_mask_LS":
        kw["attn_mask"] = torch.randn(L, S, generator=torch.Generator().manual_seed(2), dtype=D64)
    if shape.get("Hq", 3) != shape.get("Hk", 3):
        kw["enable_gqa"] = True
    q, k, v = _inputs(**shape)
    f = lambda q, k, v: sdpa(q, k, v, **kw)  # noqa: E731
    g = lambda q, k, v: oracle(q, k, v, **kw)  # noqa: E731
    _close(f(q, k, v), g(q, k, v))
    T = tuple(torch.randn_like(x) for x in (q, k, v))
    _close(torch.func.jvp(f, (q, k, v), T), torch.func.jvp(g, (q, k, v), T))
    Tk = tuple(torch.randn(5, *x.shape, dtype=D64) for x in (q, k, v))
    vj = lambda fn: torch.func.vmap(lambda *t: torch.func.jvp(fn, (q, k, v), t)[1])(*Tk)  # noqa: E731
    _close(vj(f), vj(g))
    _close(torch.func.jacrev(f, argnums=(0, 1, 2))(q, k, v), torch.func.jacrev(g, argnums=(0, 1, 2))(q, k, v))


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask"])
def test_jacfwd_vjp_grad_vmap_over_samples(case):
    kw = CASES[case]
    q, k, v = _inputs()
    f = lambda q, k, v: sdpa(q, k, v, **kw)  # noqa: E731
    g = lambda q, k, v: oracle(q, k, v, **kw)  # noqa: E731
    _close(torch.func.jacfwd(f, argnums=(0, 1, 2))(q, k, v), torch.func.jacrev(g, argnums=(0, 1, 2))(q, k, v))
    G = torch.randn(2, 3, 5, 6, dtype=D64)
    _close(torch.func.vjp(f, q, k, v)[1](G), torch.func.vjp(g, q, k, v)[1](G))
    loss = lambda fn: lambda q, k, v: fn(q, k, v).sin().sum()  # noqa: E731
    _close(torch.func.grad(loss(f), argnums=(0, 1, 2))(q, k, v), torch.func.grad(loss(g), argnums=(0, 1, 2))(q, k, v))
    # vmap over samples (the primal batched), with the per-sample mask vmapped too
    if "attn_mask" in kw:
        m = kw["attn_mask"]
        vf = torch.func.vmap(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m))(q, k, v, m)
        _close(vf, g(q, k, v))
        vjf = torch.func.vmap(
            lambda q, t, m: torch.func.jvp(lambda q: sdpa(q, k[0], v[0], attn_mask=m), (q,), (t,))[1]
        )(q, torch.ones_like(q), m)
        vjg = torch.func.vmap(
            lambda q, t, m: torch.func.jvp(lambda q: oracle(q, k[0], v[0], attn_mask=m), (q,), (t,))[1]
        )(q, torch.ones_like(q), m)
        _close(vjf, vjg)
    else:
        _close(torch.func.vmap(f)(q, k, v), g(q, k, v))


@pytest.mark.parametrize("case", ["plain", "causal", "float_mask_LS"])
def test_higher_order(case):
    """Reverse over forward (the regularisers' gradient of a k-tangent JVP), double backward, jacfwd(jacrev)."""
    kw = CASES[case] if case != "float_mask_LS" else dict(attn_mask=torch.randn(4, 6, dtype=D64))
    q, k, v = _inputs(B=1, Hq=2, Hk=2, L=4, S=6, E=3, Ev=3)
    f = lambda q, k, v: sdpa(q, k, v, **kw)  # noqa: E731
    g = lambda q, k, v: oracle(q, k, v, **kw)  # noqa: E731
    Tk = tuple(torch.randn(3, *x.shape, dtype=D64) for x in (q, k, v))

    def rof(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        JT = torch.func.vmap(lambda *t: torch.func.jvp(fn, tuple(leaves), t)[1])(*Tk)
        return torch.autograd.grad(JT.pow(2).sum(), leaves)

    _close(rof(f), rof(g), 1e-11)

    def dbl(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        gq = torch.autograd.grad(fn(*leaves).pow(3).sum(), leaves[0], create_graph=True)[0]
        return torch.autograd.grad(gq.sin().sum(), leaves)

    _close(dbl(f), dbl(g), 1e-11)
    hess = lambda fn: torch.func.jacfwd(torch.func.jacrev(lambda q: fn(q, k, v).pow(2).sum()))(q)  # noqa: E731
    _close(hess(f), hess(g), 1e-11)


def test_forward_over_forward_refused():
    q, k, v = _inputs(B=1, Hq=1, Hk=1, L=3, S=3, E=2, Ev=2)
    f = lambda q: torch.func.jvp(lambda q: sdpa(q, k, v), (q,), (torch.ones_like(q),))[1]  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        torch.func.jvp(f, (q,), (torch.ones_like(q),))


def test_bool_mask_broadcast_leading_dims_and_odd_batch():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 4, 7, 5, generator=g, dtype=D64)  # two leading batch dims
    k = torch.randn(3, 2, 4, 6, 5, generator=g, dtype=D64)
    v = torch.randn(1, 2, 4, 6, 3, generator=g, dtype=D64)  # broadcast over the first dim
    m = torch.rand(3, 1, 1, 7, 6, generator=g) > 0.3
    m[..., 0] = True
    f = lambda q, k: sdpa(q, k, v, attn_mask=m)  # noqa: E731
    gg = lambda q, k: oracle(q, k, v, attn_mask=m)  # noqa: E731
    _close(f(q, k), gg(q, k))
    T = (torch.randn_like(q), torch.randn_like(k))
    _close(torch.func.jvp(f, (q, k), T), torch.func.jvp(gg, (q, k), T))


def test_float_mask_gradient_and_tangent():
    q, k, v = _inputs(B=1, Hq=2, Hk=2)
    b = torch.randn(1, 2, 5, 7, dtype=D64)
    f = lambda b: sdpa(q, k, v, attn_mask=b)  # noqa: E731
    g = lambda b: oracle(q, k, v, attn_mask=b)  # noqa: E731
    _close(torch.func.jacrev(f)(b), torch.func.jacrev(g)(b))
    _close(torch.func.jacfwd(f)(b), torch.func.jacrev(g)(b))


def test_fully_masked_row_gives_zero_not_nan():
    q, k, v = _inputs(B=1, Hq=1, Hk=1, L=3, S=4)
    m = torch.ones(3, 4, dtype=torch.bool)
    m[1] = False
    Tk = tuple(torch.randn(4, *x.shape, dtype=D64) for x in (q, k, v))
    o = sdpa(q, k, v, attn_mask=m)
    od = torch.func.vmap(lambda *t: torch.func.jvp(lambda q, k, v: sdpa(q, k, v, attn_mask=m), (q, k, v), t)[1])(*Tk)
    gr = torch.func.grad(lambda q: sdpa(q, k, v, attn_mask=m).sum())(q)
    assert torch.isfinite(o).all() and torch.isfinite(od).all() and torch.isfinite(gr).all()
    assert (o[..., 1, :] == 0).all() and (od[..., 1, :] == 0).all()
    rows = [0, 2]
    _close(o[..., rows, :], oracle(q, k, v, attn_mask=m)[..., rows, :])


def test_vmap_jvp_is_one_k_tangent_call(monkeypatch):
    """k tangents under vmap(jvp) reach the kernel as ONE call with K = k (one softmax shared), not k calls."""
    calls = []
    real = nnf._jvp_k

    def spy(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal):
        calls.append(next(t.shape[0] for t in (qd, kd, vd, bd) if t is not None))
        return real(q, k, v, bias, o, lse, qd, kd, vd, bd, scale, causal)

    monkeypatch.setattr(nnf, "_jvp_k", spy)
    q, k, v = _inputs()
    Tq = torch.randn(8, *q.shape, dtype=D64)
    torch.func.vmap(lambda t: torch.func.jvp(lambda q: sdpa(q, k, v, is_causal=True), (q,), (t,))[1])(Tq)
    assert calls == [8]
    calls.clear()
    torch.func.jacfwd(lambda q: sdpa(q, k, v))(q)  # jacfwd: all q.numel() basis tangents in one call
    assert calls == [q.numel()]


def test_cpp_flash_contract_is_called_when_present(monkeypatch):
    """With the C++ flash ops of issue 18 (faked here by the torch reference through the agreed signature), CPU
    float64 attention calls flash_forward once and flash_jvp once with all k tangents, and gives the same result."""
    from fastjac.ops.attention import cpp

    log = []

    def flash_forward(q, k, v, *, scale, causal, bias=None):
        log.append(("fwd", q.shape))
        return nnf._fwd_ref(q, k, v, bias, scale, causal)

    def flash_jvp(q, k, v, o, lse, qd, kd, vd, *, scale, causal, bias=None):
        assert qd.shape[0] == kd.shape[0] == vd.shape[0]
        log.append(("jvp", qd.shape[0]))
        return nnf._jvp_ref(q, k, v, bias, o, lse, qd, kd, vd, None, scale, causal)

    monkeypatch.setattr(cpp, "flash_forward", flash_forward, raising=False)
    monkeypatch.setattr(cpp, "flash_jvp", flash_jvp, raising=False)
    monkeypatch.setattr(cpp, "flash_available", lambda: None, raising=False)
    q, k, v = _inputs()
    assert nnf.kernel_for(q) == "cpp-flash"
    m = _mask_bool(2, 5, 7)
    Tk = torch.randn(6, *q.shape, dtype=D64)
    got = torch.func.vmap(lambda t: torch.func.jvp(lambda q: sdpa(q, k, v, attn_mask=m), (q,), (t,))[1])(Tk)
    want = torch.func.vmap(lambda t: torch.func.jvp(lambda q: oracle(q, k, v, attn_mask=m), (q,), (t,))[1])(Tk)
    _close(got, want)
    assert log == [("fwd", q.shape), ("jvp", 6)]


def test_chunked_reference_matches_unchunked(monkeypatch):
    """Blocks of query rows (the O(S * block) memory path) give the same numbers as one block."""
    q, k, v = _inputs(L=23, S=19)
    Tk = tuple(torch.randn(3, *x.shape, dtype=D64) for x in (q, k, v))

    def run():
        return torch.func.vmap(lambda *t: torch.func.jvp(lambda q, k, v: sdpa(q, k, v, is_causal=True), (q, k, v), t))(
            *Tk
        )

    big = run()
    monkeypatch.setattr(nnf, "CHUNK_BYTES", 1)  # one query row per block
    small = run()
    _close(small, big, 1e-14)
    gr = torch.func.grad(lambda q: sdpa(q, k, v, is_causal=True).sum())(q)
    _close(gr, torch.func.grad(lambda q: oracle(q, k, v, is_causal=True).sum())(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_twice_plain_pytorch(dtype):
    q, k, v = (x.to(dtype) for x in _inputs(L=16, S=16, E=8, Ev=8))
    T = torch.randn_like(q)
    ref = torch.func.jvp(lambda q: oracle(q, k.double(), v.double()), (q.double(),), (T.double(),))
    ours = torch.func.jvp(lambda q: sdpa(q, k, v), (q,), (T,))
    plain = torch.func.jvp(lambda q: oracle(q, k, v), (q,), (T,))  # PyTorch's own ops in that precision
    for a, p, r in zip(ours, plain, ref):
        assert a.dtype == dtype
        assert (a.double() - r).abs().max() <= 2 * (p.double() - r).abs().max() + 10 * torch.finfo(dtype).eps


def test_dropout_refused_under_forward_mode_and_pytorch_in_training():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="dropout_p"):
        torch.func.jvp(lambda q: sdpa(q, k, v, dropout_p=0.5), (q,), (q,))
    torch.manual_seed(5)
    a = sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, match, exc",
    [
        (dict(dropout_p=2.0), "dropout_p", ValueError),
        (dict(attn_mask=torch.ones(3, 3, dtype=torch.bool)), "attn_mask", ValueError),
        (dict(attn_mask=torch.ones(5, 7, dtype=torch.int64)), "attn_mask", TypeError),
        (dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), "is_causal", ValueError),
        (dict(scale="x"), "scale", TypeError),
    ],
)
def test_bad_inputs(bad, match, exc):
    q, k, v = _inputs()
    with pytest.raises(exc, match=match):
        sdpa(q, k, v, **bad)
    with pytest.raises(TypeError, match="query"):
        sdpa(q.numpy(), k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(*_inputs(Hq=3, Hk=2), enable_gqa=True)


def test_forward_ad_routes_however_imported_and_restores():
    from torch.nn.functional import scaled_dot_product_attention as imported_early  # escapes a monkeypatch

    q, k, v = _inputs(L=7, S=7, Ev=4)  # L == S: PyTorch picks its CPU flash kernel (no forward AD)
    fast = torch.backends.mha.get_fastpath_enabled()
    orig = F.scaled_dot_product_attention
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda q: imported_early(q, k, v), (q,), (q,))
    with forward_ad():
        assert active() and not torch.backends.mha.get_fastpath_enabled()
        with forward_ad():  # re-entrant
            a = torch.func.jvp(lambda q: imported_early(q, k, v), (q,), (q,))[1]
        b = torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (q,))[1]
        assert active()
    assert not active() and F.scaled_dot_product_attention is orig
    assert torch.backends.mha.get_fastpath_enabled() == fast
    want = torch.func.jvp(lambda q: oracle(q, k, v), (q,), (q,))[1]
    _close(a, want)
    _close(b, want)

    @forward_ad()
    def decorated(q):
        return torch.func.jvp(lambda q: imported_early(q, k, v), (q,), (q,))[1]

    _close(decorated(q), want)
    with pytest.raises(RuntimeError, match="boom"), forward_ad():  # restored on an exception too
        raise RuntimeError("boom")
    assert not active() and torch.backends.mha.get_fastpath_enabled() == fast


def test_forward_ad_is_per_thread():
    q, k, v = _inputs(L=7, S=7, Ev=4)
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["active"] = active()
        try:  # the other thread is not routed: PyTorch's SDPA, so forward AD fails there as it always did
            torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (q,))
            seen["err"] = None
        except NotImplementedError as e:
            seen["err"] = str(e)
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with forward_ad():
        inside.set()
        release.wait(60)
    t.join(60)
    assert seen["active"] is False and "forward AD" in seen["err"]


def test_torch_compile_refused_or_documented():
    """torch.compile with a custom jvp: documented in docs/own_models.md; here, eager is the supported mode. The
    test records what this PyTorch does: the compiled function is either refused loudly or equal to eager."""
    q, k, v = _inputs(B=1, Hq=1, Hk=1)
    T = torch.randn_like(q)
    eager = torch.func.jvp(lambda q: sdpa(q, k, v), (q,), (T,))[1]
    try:
        comp = torch.compile(lambda q, t: torch.func.jvp(lambda q: sdpa(q, k, v), (q,), (t,))[1], backend="eager")
        got = comp(q, T)
    except Exception as e:  # a loud refusal is acceptable; a silent zero is not
        pytest.skip(f"torch.compile refuses it on this PyTorch ({type(e).__name__}); documented")
    _close(got, eager)
