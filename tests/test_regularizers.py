"""Regularisers (fastjac.train.regularizers): values against closed forms and dense float64 oracles, gradients against
double autograd through torch.func to 1e-8."""

import inspect

import pytest
import torch

import fastjac as fj
from fastjac.train import regularizers as R

F64 = torch.float64


def _model(kind="itrsa", D=6, H=2, S=3, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "itrsa":
        m = fj.ItrSA(D, H, dtype=F64, **kw)
    else:
        m = fj.AKOrN(D, H, osc_dim=3 if D % 3 == 0 else 2, dtype=F64, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    X = torch.randn(S, D, generator=g, dtype=F64)
    C = torch.randn(S, D, generator=g, dtype=F64)
    if kind == "akorn":
        X = m.project(X)
    return m, X, C


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _grads(val, ts):
    return torch.autograd.grad(val, ts, allow_unused=True)


def _close(ga, gb, tol=1e-8):
    for a, b in zip(ga, gb):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


def _dense(m, X, C):
    f = lambda x: m(x, C)  # noqa: E731
    n = X.numel()
    return torch.func.jacrev(f)(X).reshape(n, n)


# ----------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("group", ["concat", "head"])
def test_spec_value_and_grad_closed_form(group):
    torch.manual_seed(1)
    m = fj.ItrSA(7, 3, bias=True, dtype=F64)
    for _ in range(3):  # persistence: vectors carry over between calls
        R.spec(m, group=group, n_power_iterations=100)
    val = R.spec(m, group=group, n_power_iterations=100)

    def closed():
        tot = 0
        for name in R.WEIGHT_NAMES:
            W = getattr(m, name)
            mats = W if group == "head" else [R._grouped(W, name, "concat")[0]]
            for M in mats:
                tot = tot + (torch.linalg.svdvals(M)[0] ** 2 - 1) ** 2
        for name in R.BIAS_NAMES:
            tot = tot + getattr(m, name).pow(2).sum() ** 2
        return tot

    ref = closed()
    assert abs(val.item() - ref.item()) < 1e-10
    _close(_grads(val, _params(m)), _grads(ref, _params(m)))


def test_spec_concat_grouping_is_the_linear_weight():
    m = fj.ItrSA(6, 2, dtype=F64)
    Wq = R._grouped(m.wq, "wq", "concat")[0]  # [D, H dh]: q = x Wq gives heads side by side
    X = torch.randn(4, 6, dtype=F64)
    assert torch.allclose((X @ Wq).reshape(4, 2, 3).transpose(0, 1), X @ m.wq)
    Wo = R._grouped(m.wo, "wo", "concat")[0]  # [H dv, D]
    o = torch.randn(2, 4, 3, dtype=F64)
    assert torch.allclose(o.transpose(0, 1).reshape(4, 6) @ Wo, (o @ m.wo).sum(0))


def test_spec_state_roundtrip_and_not_in_state_dict():
    m = fj.ItrSA(8, 2, dtype=F64)
    R.spec(m)
    st = R.spec_state(m)
    assert st and not any(k.startswith("_spec") for k in m.state_dict())
    a = R.spec(m)
    m2 = fj.ItrSA(8, 2, dtype=F64)
    m2.load_state_dict(m.state_dict())
    R.load_spec_state(m2, st)
    assert R.spec(m2).item() == a.item()


def test_spec_one_step_is_cheap_and_converges():
    torch.manual_seed(0)
    m = fj.ItrSA(16, 4, dtype=F64)
    vals = [R.spec(m).item() for _ in range(400)]
    ref = sum(
        (torch.linalg.svdvals(R._grouped(getattr(m, n), n, "concat")[0])[0] ** 2 - 1) ** 2 for n in R.WEIGHT_NAMES
    ).item()
    assert abs(vals[-1] - ref) < 1e-7 * max(1, ref) and vals[-1] <= ref + 1e-9  # a lower bound that converges


# ----------------------------------------------------------------------------------------------- energy


def test_e_single_closed_form_and_zero_on_prop41_weights():
    torch.manual_seed(2)
    m = fj.ItrSA(6, 2, dtype=F64)
    val = R.e_single(m)
    ref = 0
    for h in range(2):
        A = m.wq[h] @ m.wk[h].T
        M = m.wv[h] @ m.wo[h]
        ref = ref + ((M - (A + A.T) / 2) ** 2).sum() + (((A - A.T) / 2) ** 2).sum()
    assert abs(val.item() - ref.item()) < 1e-12
    _close(_grads(val, _params(m)), _grads(ref, _params(m)))
    # weights that satisfy Prop 4.1 per head (A symmetric, Wv = A, no output projection): exactly zero
    m0 = fj.ItrSA(6, 1, out_proj=False, dtype=F64)
    with torch.no_grad():
        U = torch.randn(6, 6, dtype=F64)
        S = torch.randn(6, 6, dtype=F64)
        S = S + S.T
        m0.wq.copy_(U[None])
        m0.wk.copy_((U @ S)[None])
        m0.wv.copy_((U @ S @ U.T)[None])
    assert R.e_single(m0).item() < 1e-20


def test_e_multi_closed_form_and_parametrisations():
    torch.manual_seed(3)
    m = fj.ItrSA(8, 2, dtype=F64)  # H dv = 8 = D
    val = R.e_multi(m)
    V = torch.cat([m.wv[h] for h in range(2)], 1)
    O = torch.cat([m.wo[h] for h in range(2)], 0)
    ref = (
        sum(((m.wv[h] @ m.wo[h] - (m.wv[h] @ m.wo[h]).T) ** 2).sum() for h in range(2))
        + ((V.T @ V - torch.eye(8, dtype=F64)) ** 2).sum()
        + ((O @ O.T - torch.eye(8, dtype=F64)) ** 2).sum()
    )
    assert abs(val.item() - ref.item()) < 1e-10
    _close(_grads(val, _params(m)), _grads(ref, _params(m)))

    X = torch.randn(5, 8, dtype=F64)
    soft = R.orthogonal_values(fj.ItrSA(8, 2, dtype=F64))
    assert R.e_multi(soft).item() > 1e-3  # symmetry not yet satisfied
    assert (R.e_multi(soft).item() - R.e_multi(soft, orthogonality=False).item()) < 1e-20  # orthogonality exact
    hard = R.orthogonal_values(fj.ItrSA(8, 2, dtype=F64), hard=True)
    assert R.e_multi(hard).item() < 1e-20
    Mh = R.value_output_maps(hard)
    assert torch.allclose(Mh[0] @ Mh[1], torch.zeros(8, 8, dtype=F64), atol=1e-12)  # orthogonal head subspaces
    # the analytic Jacobian sees the parametrised weights, and gradients reach the free parameters
    Y, JT = fj.jvp(hard, X, torch.randn(5, 8, dtype=F64), backend="torch")
    JT.sum().backward()
    assert hard.parametrizations.wv.original.grad.abs().sum() > 0
    assert hard.parametrizations.wo.original.grad.abs().sum() > 0
    R.remove_orthogonal(hard)
    assert type(hard).__name__ == "ItrSA" and R.e_multi(hard).item() < 1e-20


def test_e_multi_refuses_too_many_heads():
    with pytest.raises(ValueError, match="heads"):
        R.orthogonal_values(fj.ItrSA(6, 2, head_dim=4))


# ----------------------------------------------------------------------------------------------- Jacobian: Frobenius


@pytest.mark.parametrize("kind", ["itrsa", "akorn"])
def test_jacobian_frobenius_value_and_grad(kind):
    m, X, C = _model(kind, D=6, H=2, S=3)
    X = X.clone().requires_grad_(True)
    val = R.jacobian_frobenius(m, X, C=C, probes=5, seed=4)
    V = R._probes(X, 5, 4, "rademacher").reshape(5, -1)
    J = _dense(m, X, C)
    ref = ((V @ J.T) ** 2).sum() / 5
    assert abs(val.item() - ref.item()) < 1e-10 * max(1, ref.item())
    ts = _params(m) + [X]
    _close(_grads(val, ts), _grads(ref, ts))


def test_jacobian_frobenius_unbiased_and_batched():
    m, X, C = _model("itrsa", D=6, H=2, S=3, seed=5)
    exact = (_dense(m, X, C) ** 2).sum().item()
    est = R.jacobian_frobenius(m, X, C=C, probes=4000, seed=1).item()
    assert abs(est - exact) / exact < 0.05
    Xb = torch.stack([X, X * 0.5 + 0.1])
    per = R.jacobian_frobenius(m, Xb, C=C, probes=3, seed=2, reduction="none")
    assert per.shape == (2,)
    assert abs(R.jacobian_frobenius(m, Xb, C=C, probes=3, seed=2).item() - per.mean().item()) < 1e-12


# ----------------------------------------------------------------------------------------------- Jacobian: spectral


@pytest.mark.parametrize("kind", ["itrsa", "akorn"])
def test_jacobian_spectral_value_and_grad(kind):
    m, X, C = _model(kind, D=6, H=2, S=3, seed=6)
    X = X.clone().requires_grad_(True)
    val, v = R.jacobian_spectral(m, X, C=C, iters=400, seed=0, return_vector=True)
    J = _dense(m, X, C)
    s = torch.linalg.svdvals(J)
    assert abs(val.item() - s[0].item() ** 2) < 1e-8 * s[0].item() ** 2
    ts = _params(m) + [X]
    # the same detached vector through double autograd: exact
    ref = ((J @ v.reshape(-1)) ** 2).sum()
    g = _grads(val, ts)
    _close(g, torch.autograd.grad(ref, ts, retain_graph=True))
    # and, converged, the gradient of sigma_max^2 itself
    if (s[0] - s[1]) / s[0] > 1e-2:
        _close(g, _grads(s[0] ** 2, ts), tol=1e-6)


# ----------------------------------------------------------------------------------------------- Lyapunov


def _ftl(m, X, C, h, k=None):
    kw = {"horizon": h} if "horizon" in inspect.signature(fj.finite_time_lyapunov).parameters else {"T": h}
    return fj.finite_time_lyapunov(m, X, C=C, k=k, method="dense", **kw).exponents


def _product(m, X, C, h):
    P, Xt = None, X
    for _ in range(h):
        J = _dense(m, Xt, C)
        P = J if P is None else J @ P
        Xt = m(Xt, C)
    return P


@pytest.mark.parametrize("norm", ["none", "l2"])
def test_lyapunov_full_k_equals_finite_time_lyapunov(norm):
    m, X, C = _model("itrsa", D=5, H=1, S=3, seed=7, norm=norm, eta=0.5 if norm == "none" else 1.0)
    n = X.numel()
    ours = R.lyapunov(m, X, C=C, horizon=4, k=n)
    ref = _ftl(m, X, C, 4)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(ours))
    assert torch.allclose(ours[fin], ref[fin], atol=1e-10)


@pytest.mark.parametrize("kind", ["itrsa", "akorn"])
def test_lyapunov_converged_top_k_equals_finite_time_and_its_gradient(kind):
    m, X, C = _model(kind, D=6, H=2, S=3, seed=8)
    h, k = 4, 3
    ours = R.lyapunov(m, X, C=C, horizon=h, k=k, iters=300)
    ref = _ftl(m, X, C, h)[:k]
    assert torch.allclose(ours, ref, atol=1e-9)
    P = _product(m, X, C, h)
    s = torch.linalg.svdvals(P)
    gaps = (s[:k] - s[1 : k + 1]) / s[:k]
    if bool((gaps > 1e-2).all()):
        ts = _params(m)
        _close(_grads(ours.sum(), ts), _grads((s[:k].log() / h).sum(), ts), tol=1e-6)


@pytest.mark.parametrize("kind", ["itrsa", "akorn"])
def test_lyapunov_grad_matches_double_autograd(kind):
    m, X, C = _model(kind, D=6, H=2, S=3, seed=9)
    X = X.clone().requires_grad_(True)
    h, k, seed = 5, 3, 11
    ours = R.lyapunov(m, X, C=C, horizon=h, k=k, seed=seed)
    n = X.numel()
    Q0 = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64))[0]
    P = _product(m, X, C, h)
    ref = torch.linalg.svdvals(P @ Q0).log() / h
    assert torch.allclose(ours, ref, atol=1e-10)
    ts = _params(m) + [X]
    w = torch.tensor([1.0, -0.3, 0.7], dtype=F64)
    _close(_grads((ours * w).sum(), ts), _grads((ref * w).sum(), ts))


def test_lyapunov_batched_penalty_alias_and_trivial():
    m, X, C = _model("itrsa", D=6, H=2, S=3, seed=10)
    Xb = torch.stack([X, -X])
    ex = R.lyapunov(m, Xb, C=C, horizon=3, k=2)
    assert ex.shape == (2, 2) and torch.allclose(ex[1], R.lyapunov(m, -X, C=C, horizon=3, k=2, seed=1))
    with pytest.raises(TypeError):  # the deprecated T= alias is gone (T means tangents in fastjac)
        R.lyapunov(m, X, C=C, T=3, k=2)
    p = R.lyapunov_penalty(m, Xb, C=C, horizon=3, k=2, target=0.1, iters=0)
    assert abs(p.item() - ((ex[:, 0] - 0.1) ** 2).mean().item()) < 1e-12
    p.backward()
    assert m.wq.grad.abs().sum() > 0
    full = R.lyapunov(m, X, C=C, horizon=3, k=X.numel())  # l2 norm: S radial directions are -inf, no NaN grad
    assert int(torch.isinf(full).sum()) == 3
    m.zero_grad()
    full[torch.isfinite(full)].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in _params(m) if p.grad is not None)


@pytest.mark.parametrize("kind", ["itrsa", "akorn"])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_lyapunov_max_same_value_and_gradient_as_the_k_frame(kind, iters):
    """lyapunov_max (one differentiable tangent: the Ritz vector) against lyapunov(...)[:, 0] (k tangents, QR
    every step, svdvals) and against the dense oracle svdvals(P Q0) with Q0 = lyapunov's aligned frame; weights and
    X0 gradients to 1e-8 (float64), batched with odd sizes."""
    m, X, C = _model(kind, D=6, H=2, S=5, seed=12)
    Xb = torch.stack([X, 0.8 * X + 0.05, X.flip(0)]).requires_grad_(True)
    if kind == "akorn":
        Xb = m.project(Xb.detach()).requires_grad_(True)
    h, k, seed = 5, 3, 4
    ours = R.lyapunov_max(m, Xb, C=C, horizon=h, k=k, iters=iters, seed=seed)
    ref = R.lyapunov(m, Xb, C=C, horizon=h, k=k, iters=iters, seed=seed)[:, 0]
    assert ours.shape == (3,) and torch.allclose(ours, ref, atol=1e-12, rtol=0)
    ts = _params(m) + [Xb]
    w = torch.tensor([1.0, -0.4, 0.6], dtype=F64)
    _close(_grads((ours * w).sum(), ts), _grads((ref * w).sum(), ts))
    one = R.lyapunov_max(m, Xb[1], C=C, horizon=h, k=k, iters=iters, seed=seed + 1)  # sample b uses seed + b
    assert one.dim() == 0 and abs(one.item() - ours[1].item()) < 1e-12
    # the penalty's default (which="max") goes through lyapunov_max: same value and gradient as the k-frame form
    p = R.lyapunov_penalty(m, Xb, C=C, horizon=h, k=k, iters=iters, seed=seed, target=0.05)
    ref = R.lyapunov(m, Xb, C=C, horizon=h, k=k, iters=iters, seed=seed)[:, 0]  # a fresh graph
    q = ((ref - 0.05) ** 2).mean()
    assert abs(p.item() - q.item()) < 1e-12
    _close(_grads(p, ts), _grads(q, ts))


def test_lyapunov_max_trivial_and_bad_input():
    m, X, C = _model("itrsa", D=4, H=1, S=2, seed=13, norm="none", eta=0.0)  # eta = 0, no norm: J = I
    lam = R.lyapunov_max(m, X, C=C, horizon=3, k=2)
    assert abs(lam.item()) < 1e-12  # the identity map: every exponent 0
    with pytest.raises(ValueError, match="k: expected at most"):
        R.lyapunov_max(m, X, k=99)
    with pytest.raises(ValueError, match="X0"):
        R.lyapunov_max(m, X[0])


# ----------------------------------------------------------------------------------------------- backends, errors


def test_backends_triton_refused_and_callable_autograd():
    m, X, C = _model("itrsa", D=6, H=2, S=3)
    for fn in (
        lambda: R.jacobian_frobenius(m, X, C=C, backend="triton"),
        lambda: R.jacobian_spectral(m, X, C=C, backend="triton"),
        lambda: R.lyapunov(m, X, C=C, backend="triton"),
    ):
        with pytest.raises(ValueError, match="not differentiable"):
            fn()
    f = lambda x, c: m(x, c)  # noqa: E731  a plain callable: the torch.func path, still differentiable
    a = R.jacobian_frobenius(f, X, C=C, probes=3, seed=1)
    b = R.jacobian_frobenius(m, X, C=C, probes=3, seed=1, backend="torch")
    assert abs(a.item() - b.item()) < 1e-10
    _close(_grads(a, _params(m)), _grads(b, _params(m)))
    with pytest.raises(ValueError, match="probes"):
        R.jacobian_frobenius(m, X, probes=0)
    with pytest.raises(TypeError, match="seed"):
        R.jacobian_frobenius(m, X, seed=1.5)
    with pytest.raises(TypeError, match="model"):
        R.spec(torch.nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------ penalty forms, schedule


def test_lyapunov_penalty_default_iters_is_exact_and_forms():
    """The default (iters=1) penalty sees the aligned lambda_max; the forms and aggregates are what they say."""
    m, X, C = _model("itrsa", D=6, H=2, S=3, seed=11)
    Xb = torch.stack([X, 0.7 * X + 0.1])
    exact = R.lyapunov(m, Xb, C=C, horizon=3, k=2, iters=300)[:, 0]
    one = R.lyapunov(m, Xb, C=C, horizon=3, k=2, iters=1)[:, 0]
    p = R.lyapunov_penalty(m, Xb, C=C, horizon=3, k=2, target=0.0)  # default iters=1
    assert abs(p.item() - (one**2).mean().item()) < 1e-12
    assert torch.allclose(one, exact, atol=1e-2)  # one pass is close; the random frame (iters=0) need not be
    lam = one.detach()
    for tau in (float(lam.min()) - 0.5, float(lam.mean()), float(lam.max()) + 0.5):
        kw = dict(C=C, horizon=3, k=2, target=tau)
        ab = R.lyapunov_penalty(m, Xb, form="above", reduction="none", **kw)
        be = R.lyapunov_penalty(m, Xb, form="below", reduction="none", **kw)
        sq = R.lyapunov_penalty(m, Xb, reduction="none", **kw)
        assert torch.allclose(ab, torch.relu(lam - tau) ** 2, atol=1e-12)
        assert torch.allclose(be, torch.relu(tau - lam) ** 2, atol=1e-12)
        assert torch.allclose(ab + be, sq, atol=1e-12)
        bat = R.lyapunov_penalty(m, Xb, aggregate="batch", **kw)
        assert bat.dim() == 0 and abs(bat.item() - (lam.mean().item() - tau) ** 2) < 1e-12
    g = R.lyapunov_penalty(m, Xb, C=C, horizon=3, k=2, target=float(lam.max()) + 1, form="above")
    assert g.item() == 0.0  # the hinge is flat below the target
    for bad in (dict(form="hinge"), dict(aggregate="mean")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            R.lyapunov_penalty(m, Xb, C=C, horizon=3, k=2, **bad)


def test_ramp_weight():
    assert [R.ramp_weight(t) for t in range(3)] == [1.0, 1.0, 1.0]
    assert [R.ramp_weight(t, warmup=2, ramp=4) for t in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [R.ramp_weight(t, warmup=3) for t in range(5)] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="ramp"):
        R.ramp_weight(1, ramp=-1)
