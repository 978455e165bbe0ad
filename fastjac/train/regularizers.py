"""Differentiable regularisers for training recurrent self-attention: ``loss = task + lam * reg(...)``.

Weight regularisers (the paper's section 6):

    spec(model)                    R_Spec = sum_W (sigma_max(W)^2 - 1)^2 + sum_b |b|^4 (persistent power iteration)
    e_single(model)                Prop 4.1's condition per head: value-output map = sym(Wq Wk^T), A symmetric
    e_multi(model)                 Prop 4.2's value path: orthogonal heads (W^V, W^O) + symmetric Wv_h Wo_h
    orthogonal_values(model, hard) the orthogonal parametrisation of W^V and W^O (torch parametrize); hard=True makes
                                   E-multi's constraints exact (e_multi is then 0)

Jacobian regularisers on the actual step Jacobian, by fastjac's analytic JVP/VJP (no dense matrix):

    jacobian_frobenius(step, X, C=C, probes=4)   Hutchinson estimate of |J|_F^2 (k probes share one softmax)
    jacobian_spectral(step, X, C=C, iters=8)     sigma_max(J)^2: detached power iteration + differentiable Rayleigh
    lyapunov(step, X0, C=C, horizon=16, k=4)     the k leading finite-horizon exponents of the horizon-step map
    lyapunov_penalty(step, X0, target=0.1)       (lambda_max - target)^2 (or a one-sided hinge), to train towards
                                                 the edge of chaos; iters=1 by default (unbiased lambda_max)
    ramp_weight(step, warmup, ramp)              a regulariser weight's warm-up / linear ramp factor

Backends. Every Jacobian term is differentiable in the weights and in X through the analytic ``backend="torch"``
path (the formulas are torch ops; nothing is detached) or through ``"autograd"`` (torch.func, for any callable).
``backend="auto"`` maps to ``"torch"`` for a fastjac model and to ``"autograd"`` for other callables, whatever
device the tensors are on, because the Triton kernels are not differentiable in the weights: asking for
``backend="triton"`` raises a ValueError instead of silently returning a zero gradient.

All random draws (probes, initial vectors) take one ``seed`` argument (an int), so a training step is reproducible;
pass a different seed per step (e.g. the step index) to draw fresh probes.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import NonFiniteError, check_int

__all__ = [
    "spec",
    "spec_state",
    "load_spec_state",
    "e_single",
    "e_multi",
    "orthogonal_values",
    "remove_orthogonal",
    "plain_copy",
    "jacobian_frobenius",
    "jacobian_spectral",
    "lyapunov",
    "lyapunov_penalty",
    "lyapunov_max",
    "value_output_maps",
    "WEIGHT_NAMES",
    "BIAS_NAMES",
    "ramp_weight",
    "PENALTY_FORMS",
    "PENALTY_AGGREGATES",
]

WEIGHT_NAMES = ("wq", "wk", "wv", "wo")
BIAS_NAMES = ("bq", "bk", "bv", "bo")
GROUPINGS = ("concat", "head")
DIFF_BACKENDS = ("auto", "torch", "autograd")


# ------------------------------------------------------------------------------------------------- helpers


def _core(model: nn.Module) -> nn.Module:
    """The fastjac attention core of ``model``: the model itself, or its ``.core`` (the Sudoku wrappers)."""
    m = getattr(model, "core", model)
    if not all(hasattr(m, n) for n in ("wq", "wk", "wv", "wo", "heads", "dim")):
        raise TypeError(
            f"model: expected a fastjac ItrSA/AKOrN (or a module with one as .core), got {type(model).__name__}"
        )
    return m


def _gen(seed: int, name: str = "seed") -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {seed}")
    return torch.Generator().manual_seed(seed)


def _is_fastjac(step) -> bool:
    from .. import models

    return isinstance(step, getattr(models, "RecurrentStep", (models.ItrSA, models.AKOrN)))


def _check_backend(step, backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, one of {DIFF_BACKENDS}, got {type(backend).__name__}")
    if backend == "triton":
        raise ValueError(
            "backend: the Triton path is not differentiable in the weights, so a regulariser cannot use "
            "it (its gradient would be silently zero); use backend='torch' (or 'auto', which maps to "
            "'torch' for fastjac models)"
        )
    from ..backends import differentiable_backends  # the backends' own `differentiable` property decides

    if backend != "auto" and backend not in differentiable_backends():
        raise ValueError(
            f"backend: a differentiable regulariser needs 'auto' or one of {differentiable_backends()}, got {backend!r}"
        )
    if backend == "auto":
        return "torch" if _is_fastjac(step) else "autograd"
    if backend == "torch" and not _is_fastjac(step):
        raise ValueError(f"backend: 'torch' needs a fastjac model, got a {type(step).__name__}; use 'autograd'")
    return backend


class _Lin:
    """One linearisation (out, jvp, vjp) through fastjac's public API, whichever version of it is installed."""

    def __init__(self, step, X: Tensor, C: Optional[Tensor], backend: str, need_vjp: bool = False, check: bool = True):
        try:  # the lead's one-object seam, when present
            from ..linearization import linearization as _linearization
        except ImportError:
            _linearization = None
        if _linearization is not None:
            # check=False along a trajectory validated at its first state: no finiteness reductions / host syncs
            lin = _linearization(step, X, C=C, backend=backend, check=check)
            self.out, self.jvp, self.vjp = lin.out, lin.jvp, lin.vjp
        else:
            from ..api import linearize, vjp

            self.out, self.jvp = linearize(step, X, C=C, backend=backend)
            self.vjp = vjp(step, X, C=C, backend=backend)[1] if need_vjp else None


def _sample_dims(X: Tensor) -> Tuple[int, ...]:
    return tuple(range(-2, 0))


def _check_reduction(reduction) -> str:
    """Checked for every X (a 2-D X has nothing to reduce, but a misspelt reduction is still a mistake)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def _reduce(v: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    if reduction == "none":
        return v
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


# ------------------------------------------------------------------------------------------------- Spec


def _grouped(W: Tensor, name: str, group: str) -> Tensor:
    """The matrices whose sigma_max Spec penalises: [G, m, n]."""
    if group == "head":
        return W
    H = W.shape[0]
    if name == "wo":  # W^O = [Wo_1; ...; Wo_H]: [H dv, D], the nn.Linear weight (transposed) of the output projection
        return W.reshape(1, H * W.shape[1], W.shape[2])
    return W.permute(1, 0, 2).reshape(1, W.shape[1], H * W.shape[2])  # [D, H dh]: heads side by side


def _spec_buffers(core: nn.Module, name: str, M: Tensor, seed: int) -> Tuple[Tensor, Tensor]:
    key_u, key_v = f"_spec_u_{name}", f"_spec_v_{name}"
    u = getattr(core, key_u, None)
    if u is None or u.shape != M.shape[:2] or u.dtype != M.dtype:
        g = _gen(seed)
        u = nn.functional.normalize(torch.randn(M.shape[:2], generator=g, dtype=torch.float64), dim=-1)
        v = nn.functional.normalize(torch.randn((M.shape[0], M.shape[2]), generator=g, dtype=torch.float64), dim=-1)
        # non-persistent buffers: they follow .to(), stay out of state_dict (save_model files keep their format);
        # spec_state / load_spec_state carry them through a checkpoint
        core.register_buffer(key_u, u.to(M.dtype).to(M.device), persistent=False)
        core.register_buffer(key_v, v.to(M.dtype).to(M.device), persistent=False)
    return getattr(core, key_u), getattr(core, key_v)


def spec(
    model: nn.Module, *, group: str = "concat", n_power_iterations: int = 1, biases: bool = True, seed: int = 0
) -> Tensor:
    """The paper's R_Spec = sum_W (sigma_max(W)^2 - 1)^2 + sum_b |b|^4 over the attention weights and biases.

    sigma_max by persistent power iteration, as ``torch.nn.utils.spectral_norm`` does: each call runs
    ``n_power_iterations`` steps (``v <- W^T u / |.|, u <- W v / |.|``, no gradient) from the vectors kept as
    non-persistent buffers ``_spec_u_<name>`` / ``_spec_v_<name>`` on the core, then uses the differentiable
    ``sigma = u^T W v`` (its gradient ``u v^T`` is sigma_max's once the vectors have converged). The cost is a few
    matrix-vector products per weight per step. :func:`spec_state` / :func:`load_spec_state` save and restore the
    vectors (for checkpoints); they are not in ``state_dict`` so ``fj.save_model`` files are unchanged.

    Grouping of the per-head weights (``group``):
        "concat" (default, what an ``nn.MultiheadAttention`` / ``nn.Linear`` holds): one matrix per kind,
            W^Q = [Wq_1 ... Wq_H] in R^{D x H dh} (heads side by side), likewise W^K, W^V in R^{D x H dv}, and
            W^O = [Wo_1; ...; Wo_H] in R^{H dv x D}: four sigma_max terms.
        "head": every head's Wq_h, Wk_h, Wv_h, Wo_h on its own: 4H terms.
    Biases: bq, bk, bv (all heads flattened into one vector each) and bo, each |b|^4 = (|b|^2)^2. Only the attention
    weights enter (not eta, gamma, the norm bias or AKOrN's omega); a missing Wo (out_proj=False) is skipped.

    Args:
        model: a fastjac ItrSA/AKOrN, or a module with one as ``.core``.
        seed: draws the initial vectors (first call only).

    Returns:
        A 0-dim tensor, differentiable in the weights.

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.train import regularizers as R
        >>> m = fj.ItrSA(16, 2, bias=True)
        >>> r = R.spec(m); r.backward(); m.wq.grad.shape
        torch.Size([2, 16, 8])
    """
    core = _core(model)
    if group not in GROUPINGS:
        raise ValueError(f"group: expected one of {GROUPINGS}, got {group!r}")
    n_power_iterations = check_int("n_power_iterations", n_power_iterations, 0)
    total = None
    for name in WEIGHT_NAMES:
        W = getattr(core, name, None)
        if W is None:
            continue
        M = _grouped(W, name if group == "concat" else "head", group)
        key = f"{name}_{group}"
        u, v = _spec_buffers(core, key, M, seed + WEIGHT_NAMES.index(name))
        with torch.no_grad():
            Md = M.detach()
            for _ in range(n_power_iterations):
                v.copy_(nn.functional.normalize(torch.einsum("gmn,gm->gn", Md, u), dim=-1, eps=1e-30))
                u.copy_(nn.functional.normalize(torch.einsum("gmn,gn->gm", Md, v), dim=-1, eps=1e-30))
        sigma = torch.einsum("gm,gmn,gn->g", u.clone(), M, v.clone())
        term = ((sigma**2 - 1) ** 2).sum()
        total = term if total is None else total + term
    if biases:
        for name in BIAS_NAMES:
            b = getattr(core, name, None)
            if b is not None:
                total = total + b.pow(2).sum().pow(2)
    return total


def spec_state(model: nn.Module) -> Dict[str, Tensor]:
    """The power-iteration vectors of :func:`spec` (a dict of tensors, for a checkpoint)."""
    core = _core(model)
    return {k: v.detach().clone() for k, v in core.named_buffers(recurse=False) if k.startswith("_spec_")}


def load_spec_state(model: nn.Module, state: Dict[str, Tensor]) -> None:
    """Restore the vectors saved by :func:`spec_state`."""
    core = _core(model)
    w = core.wq
    for k, v in state.items():
        if not k.startswith("_spec_"):
            raise ValueError(f"state: unexpected key {k!r} (expected _spec_u_*/_spec_v_* from spec_state)")
        core.register_buffer(k, v.to(dtype=w.dtype, device=w.device).clone(), persistent=False)


# ------------------------------------------------------------------------------------------------- energy regularisers


def value_output_maps(model: nn.Module) -> Tensor:
    """M_h = Wv_h Wo_h [H, D, D], the map by which head h writes its values into the state (Wv_h without Wo)."""
    core = _core(model)
    return core.wv if core.wo is None else core.wv @ core.wo


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.transpose(-1, -2))


def e_single(model: nn.Module) -> Tensor:
    """E-single: Prop 4.1's energy condition imposed on every head, as a penalty (0 iff it holds exactly).

    ``R = sum_h |M_h - sym(A_h)|_F^2 + |skew(A_h)|_F^2`` with ``A_h = Wq_h Wk_h^T`` and ``M_h = Wv_h Wo_h`` (the
    head's value-output map; Wv_h without an output projection). R = 0 iff ``M_h = A_h = A_h^T`` for every head:
    the condition ``Wv = (A + A^T)/2`` of Prop 4.1 for a symmetric A, under which each head's sphere flow
    ``dX/dt = Proj_X(SA_h(X))`` decreases ``E_single(X; A_h)`` (fastjac.energy; DESIGN section 3). The skew term
    is there because, for a non-symmetric A, the literal condition does not make E_single decrease (the project's
    tests exhibit a counter-example). The guarantee is per head: with H > 1 heads the sum of the heads' flows needs
    E-multi's orthogonality as well. Returns a 0-dim tensor.
    """
    core = _core(model)
    A = core.wq @ core.wk.transpose(-1, -2)
    M = value_output_maps(core)
    skew = 0.5 * (A - A.transpose(-1, -2))
    return (M - _sym(A)).pow(2).sum() + skew.pow(2).sum()


def _flat_values(core) -> Tensor:
    H, D, dv = core.wv.shape
    return core.wv.permute(1, 0, 2).reshape(D, H * dv)  # W^V = [Wv_1 ... Wv_H]


def e_multi(model: nn.Module, *, orthogonality: bool = True) -> Tensor:
    """E-multi: the value-path conditions of Prop 4.2 as a penalty (0 iff they hold exactly).

    ``R = sum_h |M_h - M_h^T|_F^2 + |W^V^T W^V - I|_F^2 + |W^O W^O^T - I|_F^2`` with M_h = Wv_h Wo_h,
    W^V = [Wv_1 ... Wv_H] in R^{D x H dv} and W^O = [Wo_1; ...; Wo_H] in R^{H dv x D}. Orthonormal columns of W^V
    make the heads' value subspaces mutually orthogonal (the U_{k,h} of Prop 4.2), orthonormal rows of W^O keep the
    written directions orthogonal, and symmetric M_h gives each head the gradient structure of its energy. The
    orthogonality terms (``orthogonality=False`` drops them) are identically 0 under :func:`orthogonal_values`,
    which is how the paper's E-multi is trained: the orthogonal parametrisation plus the symmetry penalty; with
    ``orthogonal_values(model, hard=True)`` the symmetry is exact as well and R = 0. Needs H dv <= D for the
    orthogonality (ValueError otherwise). Returns a 0-dim tensor.
    """
    core = _core(model)
    M = value_output_maps(core)
    r = (M - M.transpose(-1, -2)).pow(2).sum()
    if orthogonality:
        V = _flat_values(core)
        D, n = V.shape
        if n > D:
            raise ValueError(f"model: E-multi's orthogonal heads need heads*value_dim <= dim, got {n} > {D}")
        eye = torch.eye(n, dtype=V.dtype, device=V.device)
        r = r + (V.T @ V - eye).pow(2).sum()
        if core.wo is not None:
            O = core.wo.reshape(-1, core.wo.shape[-1])
            r = r + (O @ O.T - eye).pow(2).sum()
    return r


class _OrthoColumns(nn.Module):
    """Parametrisation: W [H, D, dv] whose concatenation [D, H dv] has orthonormal columns (QR, positive diag R)."""

    def __init__(self, transpose: bool = False):
        super().__init__()
        self.transpose = transpose  # True for Wo [H, dv, D]: rows of [H dv, D] orthonormal

    def _flat(self, W: Tensor) -> Tensor:
        H, a, b = W.shape
        return W.reshape(H * a, b).T if self.transpose else W.permute(1, 0, 2).reshape(a, H * b)

    def _unflat(self, F: Tensor, shape) -> Tensor:
        H, a, b = shape
        return F.T.reshape(H, a, b) if self.transpose else F.reshape(a, H, b).permute(1, 0, 2)

    def forward(self, W: Tensor) -> Tensor:
        Q, R = torch.linalg.qr(self._flat(W))
        s = torch.sign(torch.diagonal(R))
        s = torch.where(s == 0, torch.ones_like(s), s)
        return self._unflat(Q * s, W.shape)

    def right_inverse(self, W: Tensor) -> Tensor:
        return self.forward(W)  # any W maps to its orthonormalised version, which forward leaves unchanged


class _TiedSymmetricOutput(nn.Module):
    """Hard E-multi: Wo_h = diag(s_h) Wv_h^T, so M_h = Wv_h diag(s_h) Wv_h^T is exactly symmetric. The free
    parameter (the parametrisation's 'original') is s [H, dv]."""

    def __init__(self, core: nn.Module):
        super().__init__()
        import weakref

        self._core = weakref.ref(core)

    def forward(self, s: Tensor) -> Tensor:
        wv = self._core().wv  # parametrised: orthonormal columns
        return s.unsqueeze(-1) * wv.transpose(-1, -2)

    def right_inverse(self, W: Tensor) -> Tensor:
        wv = self._core().wv
        return torch.einsum("hcd,hdc->hc", W, wv).detach()  # the diagonal of Wo_h Wv_h (1 at an orthogonal start)


def orthogonal_values(model: nn.Module, *, hard: bool = False) -> nn.Module:
    """The orthogonal parametrisation of W^V and W^O that E-multi needs (``torch.nn.utils.parametrize``).

    ``model.wv`` becomes a function of a free parameter whose concatenation W^V [D, H dv] has orthonormal columns
    (QR with a positive diagonal), and ``model.wo`` one whose W^O [H dv, D] has orthonormal rows; fastjac's
    analytic Jacobians and every regulariser see the parametrised weights. ``hard=True`` instead ties
    ``Wo_h = diag(s_h) Wv_h^T`` with a learned s [H, dv] (initialised so that Wo = Wv^T): every M_h = Wv_h Wo_h is
    then exactly symmetric and the heads write into mutually orthogonal subspaces, so :func:`e_multi` is 0 and needs
    no penalty (the exact-constraint variant; W^O's rows are orthogonal, of lengths |s|).

    Needs H dv <= D. Returns the model (modified in place). Save with ``fj.save_model(plain_copy(model), path)``
    (or call :func:`remove_orthogonal` first, which keeps the current values as plain parameters).
    """
    from torch.nn.utils import parametrize

    core = _core(model)
    H, D, dv = core.wv.shape
    if H * dv > D:
        raise ValueError(f"model: orthogonal heads need heads*value_dim <= dim, got {H}*{dv} > {D}")
    if core.wo is None and hard:
        raise ValueError("model: hard=True ties Wo to Wv; the model has no output projection (out_proj=False)")
    parametrize.register_parametrization(core, "wv", _OrthoColumns(False))
    if core.wo is not None:
        if hard:
            with torch.no_grad():
                core.wo.copy_(core.wv.transpose(-1, -2))
            parametrize.register_parametrization(core, "wo", _TiedSymmetricOutput(core), unsafe=True)
        else:
            parametrize.register_parametrization(core, "wo", _OrthoColumns(True))
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A new fastjac model (same class and config, no parametrisation) holding ``model``'s current weights: what
    ``fj.save_model`` can write and analysis code can take, leaving the parametrised training model untouched."""
    from .. import models

    core = _core(model)
    cls = next((c for c in (models.ItrSA, models.AKOrN) if isinstance(core, c)), None)
    if cls is None:
        raise TypeError(f"model: expected a fastjac ItrSA/AKOrN, got {type(core).__name__}")
    new = cls(**core.config(), dtype=core.wq.dtype, device=core.wq.device)
    with torch.no_grad():
        new.load_state_dict({k: getattr(core, k).detach().clone() for k in new.state_dict()})
    return new


def remove_orthogonal(model: nn.Module) -> nn.Module:
    """Undo :func:`orthogonal_values`, keeping the current (orthogonal) values as plain parameters."""
    from torch.nn.utils import parametrize

    core = _core(model)
    for name in ("wo", "wv"):
        if parametrize.is_parametrized(core, name):
            parametrize.remove_parametrizations(core, name, leave_parametrized=True)
    return model


# ------------------------------------------------------------------------------------------------- Jacobian regularisers


def _probes(X: Tensor, k: int, seed: int, dist: str) -> Tensor:
    g = _gen(seed)
    shape = (k,) + tuple(X.shape)
    if dist == "rademacher":
        V = torch.randint(0, 2, shape, generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    elif dist == "gaussian":
        V = torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"dist: expected 'rademacher' or 'gaussian', got {dist!r}")
    return V.to(dtype=X.dtype, device=X.device)


def jacobian_frobenius(
    step,
    X: Tensor,
    *,
    C: Optional[Tensor] = None,
    probes: int = 4,
    seed: int = 0,
    dist: str = "rademacher",
    backend: str = "auto",
    reduction: str = "mean",
) -> Tensor:
    """Hutchinson estimate of the squared Frobenius norm of the step Jacobian, ``|J|_F^2 ~ (1/k) sum_p |J v_p|^2``.

    The k probes (Rademacher, or Gaussian; both unbiased) share one linearisation and, on the analytic path, one
    softmax: the cost is one forward of the step plus a k-tangent JVP, and the value is differentiable in the
    weights and in X (and C).

    Args:
        step: a fastjac model or any callable X -> X. X: [S, D] or [B, S, D]. C: injected input or None.
        probes: k. seed: draws the probes. backend: "auto" | "torch" | "autograd" (see the module docstring;
            "triton" is refused). reduction: for a batched X, "mean" (default) / "sum" over samples, or "none" [B].

    Returns:
        A 0-dim tensor (or [B] with reduction="none").

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.train import regularizers as R
        >>> m = fj.ItrSA(16, 2)
        >>> R.jacobian_frobenius(m, torch.randn(4, 7, 16), probes=4).shape
        torch.Size([])
    """
    be = _check_backend(step, backend)
    k = check_int("probes", probes, 1)
    _check_reduction(reduction)
    lin = _Lin(step, X, C, be)
    V = _probes(X, k, seed, dist)
    JV = lin.jvp(V)  # [k, *X.shape]
    per = JV.pow(2).sum(dim=(-2, -1)).mean(0)  # [] or [B]
    return _reduce(per, reduction) if X.dim() == 3 else per


def jacobian_spectral(
    step,
    X: Tensor,
    *,
    C: Optional[Tensor] = None,
    iters: int = 8,
    seed: int = 0,
    v0: Optional[Tensor] = None,
    backend: str = "auto",
    reduction: str = "mean",
    return_vector: bool = False,
):
    """sigma_max(J)^2 of the step Jacobian by power iteration on J^T J (JVP + VJP, no dense matrix).

    ``iters`` power steps ``v <- J^T J v / |.|`` run without gradient from a seeded random v (or ``v0``, e.g. the
    vector of the previous training step: ``return_vector=True`` returns it); the result is the differentiable
    Rayleigh quotient ``|J v|^2`` at the detached unit v, whose gradient equals that of sigma_max^2 once v has
    converged (it is a lower bound before). Per sample for a batched X.

    Returns:
        A 0-dim tensor (or [B] with reduction="none"); with ``return_vector`` also v (X's shape, detached).
    """
    be = _check_backend(step, backend)
    iters = check_int("iters", iters, 0)
    _check_reduction(reduction)
    if v0 is None:
        v = torch.randn(X.shape, generator=_gen(seed), dtype=torch.float64).to(dtype=X.dtype, device=X.device)
    else:
        if not isinstance(v0, Tensor) or v0.shape != X.shape:
            raise ValueError(f"v0: expected a tensor of X's shape {tuple(X.shape)}, got {getattr(v0, 'shape', v0)}")
        v = v0.detach().to(dtype=X.dtype, device=X.device)
    unit = lambda t: t / t.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-300)  # noqa: E731
    v = unit(v)
    if iters:
        with torch.no_grad():
            lin0 = _Lin(step, X.detach(), None if C is None else C.detach(), be, need_vjp=True)
            for _ in range(iters):
                v = unit(lin0.vjp(lin0.jvp(v)))
    lin = _Lin(step, X, C, be)
    per = lin.jvp(v).pow(2).sum(dim=(-2, -1))
    out = _reduce(per, reduction) if X.dim() == 3 else per
    return (out, v.detach()) if return_vector else out


def _n_trivial(step, S: int, D: int) -> int:
    try:
        from ..analysis.lyapunov import trivial_count
    except ImportError:  # pragma: no cover
        return 0
    return trivial_count(step, S, D)


def _trivial_below(dtype: torch.dtype) -> float:
    return math.log(1e3 * torch.finfo(dtype).eps)


def lyapunov(
    step,
    X0: Tensor,
    *,
    C: Optional[Tensor] = None,
    horizon: int = 16,
    k: Optional[int] = None,
    iters: int = 0,
    seed: int = 0,
    backend: str = "auto",
) -> Tensor:
    """The k leading finite-horizon Lyapunov exponents of the ``horizon``-step map, differentiable.

    ``lambda_i = (1/horizon) ln sigma_i(P Q0)`` with ``P = J_{horizon-1} ... J_0`` along the trajectory from X0 and
    Q0 [S*D, k] orthonormal: the k tangents are pushed through the trajectory one JVP per step (one linearisation
    answers all k; they share one softmax), re-orthonormalised by a QR every step (gradients flow through the QR, the
    JVPs and the trajectory itself), and the singular values of the accumulated k x k triangular factor
    ``R_{h-1} ... R_0`` give the exponents (accumulated in float64).

    Which Q0. ``iters=0``: Q0 is a seeded random orthonormal frame, so the exponents are those of the random
    k-dimensional subspace (the Benettin/QR finite-horizon estimate). Its largest is a *biased* estimate of the true
    lambda_max: below it by about ``ln(n/k) / (2 horizon)`` (a random unit vector has |q . v_1|^2 ~ k/n in the top
    singular direction): 0.17 at k = 2, 0.15 at k = 4 for n = 512, horizon = 16, measured gaps -0.15 ... -0.18 on
    trained 4x4 Sudoku cores. A regulariser trained on it towards 0.1 drives the true lambda_max to ~ +0.25;
    :func:`lyapunov_penalty` therefore defaults to ``iters=1`` (exact to ~1e-4 at k = 4 on those cores). ``iters > 0``: first ``iters`` passes of subspace iteration on
    ``P^T P`` (horizon JVPs and horizon VJPs each, no gradient) align Q0 with P's top-k right singular vectors, and
    then the exponents equal ``fj.finite_time_lyapunov(step, X0, C=C, horizon=...).exponents[:k]`` (the k leading
    ones) and their gradient is the exact gradient of those exponents (Q0 enters only through converged directions).
    With k = S*D any orthonormal Q0 is exact (iters is then irrelevant).

    Exponents of directions killed by normalisation (below ``log(1000 eps)`` of the dtype, as
    ``finite_time_lyapunov`` marks them) are returned as -inf and carry no gradient: pick k below the number of
    non-trivial directions (S*D - S for ItrSA with l2 norm) for a training signal. The QR backward needs the k
    propagated tangents to stay linearly independent, which holds for k at most the rank of the step Jacobian.

    Args:
        step: a fastjac model or any callable. X0: [S, D] or [B, S, D] (per-sample exponents). C: injected input.
        horizon: number of steps (the paper: 16). k: number of exponents
            (default min(4, S*D)). iters: subspace-iteration passes for Q0 (see above). seed: draws Q0 (sample b of a batch: seed + b).
        backend: "auto" | "torch" | "autograd" ("triton" is refused).

    Returns:
        [k] (or [B, k]) exponents, descending, in X0's dtype's precision as float64, differentiable.

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.train import regularizers as R
        >>> m = fj.ItrSA(8, 2, dtype=torch.float64)
        >>> R.lyapunov(m, torch.randn(5, 8, dtype=torch.float64), horizon=16, k=3).shape
        torch.Size([3])
    """
    fr = _Frame(step, X0, C, horizon, k, iters, seed, backend)
    S, D, n, k, X = fr.S, fr.D, fr.n, fr.k, fr.X
    try:
        sv = torch.linalg.svdvals(fr.frame_product())  # [B, k], descending
    except torch.linalg.LinAlgError:  # NaN/inf reached the QR/SVD: only when the finiteness checks are off
        raise fr.nonfinite() from None
    tiny = torch.finfo(torch.float64).tiny
    ex = sv.clamp_min(tiny).log() / fr.horizon
    triv = ex.detach() < _trivial_below(X.dtype)
    n_triv = _n_trivial(step, S, D)
    if n_triv and k > n - n_triv:  # the structural tail, as finite_time_lyapunov marks it
        triv[..., n - n_triv :] = True
    ex = ex.masked_fill(triv, float("-inf"))
    return ex if fr.batched else ex[0]


class _Frame:
    """What :func:`lyapunov` and :func:`lyapunov_max` share: the checked arguments, one differentiable
    linearisation per step of the trajectory from X0, and the frame Q0 [B, n, k] (seeded random, then ``iters``
    passes of subspace iteration on P^T P under no_grad when k < n)."""

    def __init__(self, step, X0, C, horizon, k, iters, seed, backend):
        be = _check_backend(step, backend)
        self.horizon = horizon = check_int("horizon", horizon, 1)
        iters = check_int("iters", iters, 0)
        if not isinstance(X0, Tensor) or X0.dim() not in (2, 3):
            raise ValueError(
                f"X0: expected a tensor [S, D] or [B, S, D], got {getattr(X0, 'shape', type(X0).__name__)}"
            )
        self.batched = X0.dim() == 3
        X = self.X = X0 if self.batched else X0.unsqueeze(0)
        Cb = C if C is None or self.batched or C.dim() == 3 else C.unsqueeze(0)
        self.B, self.S, self.D = B, S, D = X.shape
        self.n = n = S * D
        self.k = k = min(4, n) if k is None else check_int("k", k, 1)
        if k > n:
            raise ValueError(f"k: expected at most S*D = {n}, got {k}")
        _gen(seed)  # validates
        # sample b draws its frame with seed + b (as lyapunov_spectrum does): a batched call equals B single calls
        Q0 = torch.linalg.qr(
            torch.stack(
                [
                    torch.randn(n, k, generator=torch.Generator().manual_seed(seed + b), dtype=torch.float64)
                    for b in range(B)
                ]
            )
        )[0]
        Q0 = Q0.to(dtype=X.dtype, device=X.device)
        align = bool(iters) and k < n
        # one (differentiable) linearisation per step, shared by the subspace iteration (run under no_grad on the
        # same objects) and the gradient pass: the trajectory is computed once (it was twice before: ~20 % of a step)
        self.lins, Xt = [], X
        for t in range(horizon):
            lin = _Lin(step, Xt, Cb, be, need_vjp=align, check=t == 0)
            self.lins.append(lin)
            Xt = lin.out
        if align:
            with torch.no_grad():
                Q = Q0
                for _ in range(iters):
                    V = self.as_tangent(Q)
                    for lin in self.lins:
                        V = lin.jvp(V)
                    for lin in reversed(self.lins):
                        V = lin.vjp(V)
                    Q = torch.linalg.qr(self.as_matrix(V).double())[0].to(X.dtype)
                Q0 = Q
        self.Q0 = Q0

    def frame_product(self) -> Tensor:
        """The k tangents of Q0 pushed through the horizon, a QR every step: the accumulated triangular factor
        ``R_{h-1} ... R_0`` [B, k, k] (float64), with ``P Q0 = Q_h R_{h-1} ... R_0``; differentiable unless called
        under no_grad."""
        V, Rprod = self.as_tangent(self.Q0), None
        for lin in self.lins:
            Qm, R = torch.linalg.qr(self.as_matrix(lin.jvp(V)).double())
            # a positive diagonal (QR's signs are arbitrary; sigma of the product does not depend on them)
            sgn = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).detach()
            sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
            Qm, R = Qm * sgn.unsqueeze(-2), R * sgn.unsqueeze(-1)
            Rprod = R if Rprod is None else R @ Rprod
            V = self.as_tangent(Qm.to(self.X.dtype))
        return Rprod

    def as_tangent(self, M: Tensor) -> Tensor:  # [B, n, j] -> [j, B, S, D]
        j = M.shape[-1]
        return M.permute(2, 0, 1).reshape(j, self.B, self.S, self.D)

    def as_matrix(self, V: Tensor) -> Tensor:  # [j, B, S, D] -> [B, n, j]
        return V.reshape(V.shape[0], self.B, self.n).permute(1, 2, 0)

    def nonfinite(self) -> NonFiniteError:
        return NonFiniteError(
            f"lyapunov: the tangents became NaN/inf within the horizon of {self.horizon} steps (a diverging model: "
            f"the state or its Jacobian overflowed {self.X.dtype}); shorten the horizon, use float64, or turn "
            f"fastjac.config.check_finite on to find the step"
        )


def lyapunov_max(
    step,
    X0: Tensor,
    *,
    C: Optional[Tensor] = None,
    horizon: int = 16,
    k: Optional[int] = None,
    iters: int = 1,
    seed: int = 0,
    backend: str = "auto",
) -> Tensor:
    """``lyapunov(...)[..., 0]`` (the leading exponent, same value and same gradient) at a fraction of the
    backward cost: what :func:`lyapunov_penalty` uses for ``which="max"``.

    Why it is the same. :func:`lyapunov`'s lambda_max is the top Ritz value of P on the fixed (detached) subspace
    span(Q0): ``sigma(theta) = max_{y in span(Q0), |y| = 1} |P(theta) y|``. By the envelope theorem its gradient is
    that of ``|P(theta) y*|`` at the maximiser y* held fixed. So the k-tangent pass runs once without a graph
    (JVPs and QRs under no_grad) to find y* = Q0 v1 (v1: the top right singular vector of the accumulated
    triangular factor), and only one tangent per board is pushed through the horizon with a graph, renormalised
    every step (``lambda = sum_t ln |w_t| / horizon``, no QR to differentiate). Equal to :func:`lyapunov`'s value to
    rounding and its gradient to ~1e-8 in float64 (tests), as long as the top Ritz value is simple.

    Args / returns: as :func:`lyapunov`, but [B] (or 0-dim) instead of [B, k] ([k]). -inf (no gradient) where the
    leading direction is trivial (killed by normalisation).

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.train import regularizers as R
        >>> m = fj.ItrSA(8, 2, dtype=torch.float64)
        >>> X0 = torch.randn(5, 8, dtype=torch.float64)
        >>> bool(torch.isclose(R.lyapunov_max(m, X0, k=3), R.lyapunov(m, X0, k=3, iters=1)[0]))
        True
    """
    fr = _Frame(step, X0, C, horizon, k, iters, seed, backend)
    X = fr.X
    try:
        with torch.no_grad():  # the Ritz vector of span(Q0): the k-tangent pass without a graph
            v1 = torch.linalg.svd(fr.frame_product())[2][:, 0, :]  # [B, k]: top right singular vector (Vh[0])
            y = (fr.Q0.double() @ v1.unsqueeze(-1)).to(X.dtype)  # [B, n, 1]
        w = fr.as_tangent(y)[0]  # [B, S, D]
        logs = []
        for lin in fr.lins:
            z = lin.jvp(w.unsqueeze(0))[0]
            nz = z.double().flatten(1).norm(dim=1)  # [B]
            logs.append(nz.clamp_min(torch.finfo(torch.float64).tiny).log())
            w = z / nz.to(z.dtype).clamp_min(torch.finfo(z.dtype).tiny).view(-1, 1, 1)
        lam = torch.stack(logs).sum(0) / fr.horizon
    except torch.linalg.LinAlgError:
        raise fr.nonfinite() from None
    if not torch.isfinite(lam.detach()).all():
        raise fr.nonfinite()
    lam = lam.masked_fill(lam.detach() < _trivial_below(X.dtype), float("-inf"))
    return lam if fr.batched else lam[0]


PENALTY_FORMS = ("squared", "above", "below")
PENALTY_AGGREGATES = ("board", "batch")


def lyapunov_penalty(
    step,
    X0: Tensor,
    *,
    C: Optional[Tensor] = None,
    target: float = 0.1,
    horizon: int = 16,
    k: int = 4,
    iters: int = 1,
    seed: int = 0,
    which: str = "max",
    backend: str = "auto",
    reduction: str = "mean",
    form: str = "squared",
    aggregate: str = "board",
) -> Tensor:
    """A penalty that trains a model towards a chosen finite-horizon exponent (e.g. the slightly chaotic
    lambda_max ~ 0.1 of the paper's best models), from :func:`lyapunov`'s k leading exponents.

    ``lam`` is lambda_max (``which="max"``) or the mean of the k finite exponents (``"mean"``), per board. ``form``:
    ``"squared"`` ``(lam - target)^2`` (two-sided); ``"above"`` ``relu(lam - target)^2`` (a hinge: only exponents
    above the target are penalised, e.g. "stay at most this chaotic"); ``"below"`` ``relu(target - lam)^2``.
    ``aggregate``: ``"board"`` (default) applies the form to every board and reduces the [B] values by
    ``reduction`` (mean / sum / none): every board is pulled to the target; ``"batch"`` applies it to the batch
    mean of ``lam`` (one value; ``reduction`` is then irrelevant): only the average exponent is pulled, boards may
    spread around it. An X0 without a batch dimension gives a 0-dim tensor either way.

    ``iters`` (default 1): subspace-iteration passes aligning the frame with the top-k singular directions before
    the differentiable pass. ``iters=0`` uses a random frame, whose lambda_max is biased low by about
    ``ln(S*D/k) / (2 horizon)`` (0.15 at k = 4, S*D = 512, horizon = 16), so a target is then overshot by that much;
    one pass removes the bias to ~1e-4 on trained Sudoku cores for about 20 % more cost.

    Returns:
        A 0-dim tensor ([B] with aggregate="board", reduction="none" and a batched X0), differentiable.

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.train import regularizers as R
        >>> m = fj.ItrSA(8, 2, dtype=torch.float64)
        >>> X0 = torch.randn(2, 5, 8, dtype=torch.float64)
        >>> R.lyapunov_penalty(m, X0, horizon=4, k=2, target=0.0, form="above").shape
        torch.Size([])
    """
    if which not in ("max", "mean"):
        raise ValueError(f"which: expected 'max' or 'mean', got {which!r}")
    _check_reduction(reduction)
    if form not in PENALTY_FORMS:
        raise ValueError(f"form: expected one of {PENALTY_FORMS}, got {form!r}")
    if aggregate not in PENALTY_AGGREGATES:
        raise ValueError(f"aggregate: expected one of {PENALTY_AGGREGATES}, got {aggregate!r}")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target):
        raise ValueError(f"target: expected a finite number, got {target!r}")
    if which == "max":  # same value and gradient as lyapunov(...)[..., 0], one differentiable tangent per board
        val = lyapunov_max(step, X0, C=C, horizon=horizon, k=k, iters=iters, seed=seed, backend=backend)
        val = val if val.dim() == 1 else val.unsqueeze(0)
    else:
        ex = lyapunov(step, X0, C=C, horizon=horizon, k=k, iters=iters, seed=seed, backend=backend)
        ex = ex if ex.dim() == 2 else ex.unsqueeze(0)
        fin = torch.isfinite(ex)
        val = torch.where(fin, ex, torch.zeros_like(ex)).sum(-1) / fin.sum(-1).clamp_min(1)
    if aggregate == "batch":
        val = val.mean()
    d = val - target
    per = d**2 if form == "squared" else (torch.relu(d) if form == "above" else torch.relu(-d)) ** 2
    if aggregate == "batch":
        return per
    return _reduce(per, reduction) if X0.dim() == 3 else per[0]


def ramp_weight(step: int, *, warmup: int = 0, ramp: int = 0) -> float:
    """The factor of a regulariser's weight at optimizer step ``step``: 0 for the first ``warmup`` steps, then a
    linear ramp to 1 over ``ramp`` steps (1 at once with ramp = 0). Lets the task loss shape the model before a
    strong regulariser acts (at initialisation the 4x4 Sudoku core has lambda_max ~ -1.5: a squared Lyapunov
    penalty of weight 1 is then ~2.6, above the cross-entropy).

    Example:
        >>> [ramp_weight(t, warmup=2, ramp=4) for t in range(8)]
        [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    step, warmup, ramp = check_int("step", step, 0), check_int("warmup", warmup, 0), check_int("ramp", ramp, 0)
    if step < warmup:
        return 0.0
    return 1.0 if ramp == 0 else min(1.0, (step - warmup + 1) / ramp)
