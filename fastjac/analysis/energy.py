"""Energy-based self-attention (docs/design.md section 3, the paper's Props 4.1 and 4.2): energies, weight constructors
that satisfy the propositions (and a counter-example that does not), and an RK4 integrator for the flows.

Attention here is the paper's bias-free form without output projection: per head h,
``SA_h(X)_i = Σ_j softmax_j(β x_iᵀ A_h x_j) Wv_hᵀ x_j`` with ``A_h = Wq_h Wk_hᵀ``, and

    E_single(X) = −(1/2β) Σ_ij exp(β x_iᵀ A x_j),          E_multi(X) = Σ_h E_single(X; A_h).

- Prop 4.1: with ``Wv = (A + Aᵀ)/2`` and A symmetric (see :func:`symmetric_single_head` for why) the sphere flow ``dX/dt = Proj_X(SA(X))`` (tokens on the unit sphere,
  ``Proj_X(Y)_i = y_i − (x_i·y_i) x_i``) has ``dE/dt = −Σ_i Z_i ‖Proj(SA_i)‖² ≤ 0``, ``Z_i = Σ_j exp(β x_iᵀ A x_j)``.
- Prop 4.2: with ``A_h = U_{1,h} U_{2,h}ᵀ``, all U's mutually orthonormal, and ``Wv_h = (A_h + A_hᵀ)/2``, the heads
  write into orthogonal subspaces, the cross terms vanish and ``dX/dt = Σ_h SA_h(X)`` decreases E_multi.

The flows are integrated by classical RK4 with a fixed step (the sphere flow is retracted onto the sphere after every
step); the energy is recorded at every step, so monotone decrease, or its failure, can be read off directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .._checks import check_int as _int
from .._compat import make_generator

F64 = torch.float64
FLOWS = ("sphere", "free")


@dataclass
class EnergySA:
    """Weights of bias-free multi-head SA without output projection. wq, wk [H, D, dh]; wv [H, D, D]; beta > 0."""

    wq: Tensor
    wk: Tensor
    wv: Tensor
    beta: float

    @property
    def heads(self) -> int:
        return self.wq.shape[0]

    @property
    def dim(self) -> int:
        return self.wq.shape[1]

    def A(self) -> Tensor:
        """A_h = Wq_h Wk_hᵀ: [H, D, D]."""
        return self.wq @ self.wk.transpose(-1, -2)


def _check_state(X, D: Optional[int] = None) -> Tensor:
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError(f"X: expected a floating-point torch.Tensor, got {type(X).__name__}")
    if X.dim() != 2 or (D is not None and X.shape[1] != D):
        raise ValueError(f"X: expected shape [S, {D if D is not None else 'D'}], got {tuple(X.shape)}")
    return X


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta: expected a number > 0, got {beta!r}")
    return float(beta)


def _heads(W: Tensor, name: str) -> Tensor:
    if not isinstance(W, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() == 2:
        return W.unsqueeze(0)
    if W.dim() != 3:
        raise ValueError(f"{name}: expected [D, dh] or [H, D, dh], got {tuple(W.shape)}")
    return W


def E_single(X: Tensor, Wq: Tensor, Wk: Tensor, beta: float) -> Tensor:
    """``E(X) = −(1/2β) Σ_ij exp(β x_iᵀ Wq Wkᵀ x_j)``. X [S, D]; Wq, Wk [D, dh]. Returns a 0-dim tensor.

    Example:
        >>> import torch
        >>> X = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
        >>> W = torch.eye(4, dtype=torch.float64)
        >>> round(E_single(X, W, W, 1.0).item() + 0.5 * torch.exp(X @ X.T).sum().item(), 12)
        0.0
    """
    beta = _check_beta(beta)
    if not isinstance(Wq, Tensor) or Wq.dim() != 2:
        raise ValueError(f"Wq: expected a [D, dh] tensor, got {getattr(Wq, 'shape', type(Wq).__name__)}")
    if not isinstance(Wk, Tensor) or Wk.shape != Wq.shape:
        raise ValueError(f"Wk: expected Wq's shape {tuple(Wq.shape)}, got {getattr(Wk, 'shape', None)}")
    X = _check_state(X, Wq.shape[0])
    L = beta * (X @ Wq) @ (X @ Wk).T
    return -torch.exp(L).sum() / (2 * beta)


def E_multi(X: Tensor, Wq: Tensor, Wk: Tensor, beta: float) -> Tensor:
    """``Σ_h E_single(X; Wq_h, Wk_h)``. X [S, D]; Wq, Wk [H, D, dh]. Returns a 0-dim tensor.

    Example:
        >>> import torch
        >>> p = orthogonal_multi_head(8, 2, seed=0)
        >>> E_multi(torch.randn(6, 8, dtype=torch.float64), p.wq, p.wk, p.beta).shape
        torch.Size([])
    """
    Wq, Wk = _heads(Wq, "Wq"), _heads(Wk, "Wk")
    if Wk.shape != Wq.shape:
        raise ValueError(f"Wk: expected Wq's shape {tuple(Wq.shape)}, got {tuple(Wk.shape)}")
    return sum(E_single(X, Wq[h], Wk[h], beta) for h in range(Wq.shape[0]))


def energy(p: EnergySA, X: Tensor) -> Tensor:
    """E_multi of the weights ``p`` at X [S, D] (E_single for one head)."""
    return E_multi(X, p.wq, p.wk, p.beta)


def sa_heads(p: EnergySA, X: Tensor) -> Tensor:
    """``Σ_h SA_h(X)``, ``SA_h(X)_i = Σ_j softmax_j(β x_iᵀ A_h x_j) Wv_hᵀ x_j``. X [S, D] -> [S, D]."""
    X = _check_state(X, p.dim)
    q = torch.einsum("sd,hde->hse", X, p.wq)
    k = torch.einsum("sd,hde->hse", X, p.wk)
    v = torch.einsum("sd,hde->hse", X, p.wv)
    P = torch.softmax(p.beta * q @ k.transpose(-1, -2), dim=-1)
    return (P @ v).sum(0)


def _proj(X: Tensor, Y: Tensor) -> Tensor:
    return Y - (X * Y).sum(-1, keepdim=True) * X


# ------------------------------------------------------------------------------------------ constructors ----


def _gen(generator: Optional[torch.Generator]) -> torch.Generator:
    # the constructors are deterministic by default: no seed means seed 0, not torch's global RNG
    return torch.Generator().manual_seed(0) if generator is None else generator


def symmetric_single_head(
    dim: int,
    *,
    head_dim: Optional[int] = None,
    beta: float = 1.0,
    scale: float = 1.0,
    symmetric_A: bool = True,
    seed: Optional[Union[int, torch.Generator]] = None,
    dtype=F64,
) -> EnergySA:
    """Random single-head weights for Prop 4.1: ``Wv = (A + Aᵀ)/2`` with ``A = Wq Wkᵀ``.

    With ``symmetric_A=True`` (default) ``Wk = Wq M`` with a random symmetric M, so A is symmetric (indefinite) and
    Wv = A: then ``∂E/∂x_i = −Z_i SA_i`` and the sphere flow provably decreases E. With ``symmetric_A=False`` Wq
    and Wk are independent and only the value matrix is symmetrised; **this does not guarantee descent**: the
    weights Σ_j e_ij and Σ_j e_ji of ∂E/∂x_i differ when A ≠ Aᵀ, and ``tests/test_analysis.py`` exhibits a seeded
    trajectory along which E rises (docs/design.md's transcription of Prop 4.1 needs A symmetric for our E and SA).

    Example:
        >>> import torch
        >>> p = symmetric_single_head(6, seed=0)
        >>> A = p.A()[0]; torch.allclose(p.wv[0], (A + A.T) / 2), torch.allclose(A, A.T)
        (True, True)
    """
    generator = make_generator(seed)
    D = _int("dim", dim)
    dh = _int("head_dim", head_dim) if head_dim is not None else D
    g = _gen(generator)
    wq = scale * torch.randn(1, D, dh, generator=g, dtype=F64) / math.sqrt(D)
    if symmetric_A:
        M = torch.randn(dh, dh, generator=g, dtype=F64) / math.sqrt(dh)
        wk = wq @ (0.5 * (M + M.T)) * math.sqrt(D)  # A = Wq M Wqᵀ: symmetric, entries of the same order as below
    else:
        wk = scale * torch.randn(1, D, dh, generator=g, dtype=F64) / math.sqrt(D)
    A = wq @ wk.transpose(-1, -2)
    wv = 0.5 * (A + A.transpose(-1, -2))
    return EnergySA(wq.to(dtype), wk.to(dtype), wv.to(dtype), _check_beta(beta))


def orthogonal_multi_head(
    dim: int,
    heads: int,
    *,
    beta: float = 1.0,
    scale: float = 1.0,
    seed: Optional[Union[int, torch.Generator]] = None,
    dtype=F64,
) -> EnergySA:
    """Random multi-head weights satisfying Prop 4.2.

    The columns of one random orthogonal D×D matrix are split into 2H blocks ``U_{1,h}, U_{2,h} ∈ R^{D×D/(2H)}``
    (so all are mutually orthonormal); ``Wq_h = √scale·U_{1,h}``, ``Wk_h = √scale·U_{2,h}`` (A_h = scale·U_{1,h}
    U_{2,h}ᵀ; a positive scale leaves the proposition intact) and ``Wv_h = (A_h + A_hᵀ)/2``. Needs 2H | D.

    Example:
        >>> import torch
        >>> p = orthogonal_multi_head(8, 2, seed=0)
        >>> p.wq.shape, p.wv.shape
        (torch.Size([2, 8, 2]), torch.Size([2, 8, 8]))
    """
    generator = make_generator(seed)
    D, H = _int("dim", dim), _int("heads", heads)
    if D % (2 * H):
        raise ValueError(f"heads: Prop 4.2 needs 2*heads to divide dim={D}, got heads={H}")
    if not scale > 0:
        raise ValueError(f"scale: expected a number > 0, got {scale!r}")
    r = D // (2 * H)
    g = _gen(generator)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64)).Q
    U = Q.T.reshape(2 * H, r, D).transpose(-1, -2)  # [2H, D, r]
    wq, wk = math.sqrt(scale) * U[0::2], math.sqrt(scale) * U[1::2]
    A = wq @ wk.transpose(-1, -2)
    wv = 0.5 * (A + A.transpose(-1, -2))
    return EnergySA(wq.to(dtype), wk.to(dtype), wv.to(dtype), _check_beta(beta))


def random_counterexample(
    dim: int,
    heads: int = 1,
    *,
    head_dim: Optional[int] = None,
    beta: float = 1.0,
    scale: float = 1.0,
    seed: Optional[Union[int, torch.Generator]] = None,
    dtype=F64,
) -> EnergySA:
    """Generic weights (Wq, Wk, Wv i.i.d. Gaussian, std ``scale/√D``), violating Props 4.1/4.2: no energy descent.

    Example:
        >>> import torch
        >>> random_counterexample(6, 2, seed=0).wv.shape
        torch.Size([2, 6, 6])
    """
    generator = make_generator(seed)
    D, H = _int("dim", dim), _int("heads", heads)
    dh = _int("head_dim", head_dim) if head_dim is not None else D
    g = _gen(generator)
    w = lambda *s: (scale * torch.randn(*s, generator=g, dtype=F64) / math.sqrt(D)).to(dtype)  # noqa: E731
    return EnergySA(w(H, D, dh), w(H, D, dh), w(H, D, D), _check_beta(beta))


# ---------------------------------------------------------------------------------------------- the flows ----


@dataclass
class FlowResult:
    """times [T+1]; states [T+1, S, D]; energy [T+1] float64 (E_multi along the trajectory).

    ``max_increase`` is the largest one-step rise of the energy (≤ 0 up to integrator error means monotone).
    """

    times: Tensor
    states: Tensor
    energy: Tensor

    @property
    def max_increase(self) -> float:
        return self.energy.diff().max().item() if self.energy.numel() > 1 else 0.0

    def to_dict(self) -> dict:
        return {"times": self.times.tolist(), "energy": self.energy.tolist(), "max_increase": self.max_increase}


def integrate_flow(p: EnergySA, X0: Tensor, *, flow: str = "sphere", dt: float = 0.01, steps: int = 200) -> FlowResult:
    """Integrate ``dX/dt = Proj_X(Σ_h SA_h(X))`` (``flow="sphere"``, Prop 4.1; X0 is put on the unit sphere and
    the state retracted onto it after each step) or ``dX/dt = Σ_h SA_h(X)`` (``flow="free"``, Prop 4.2) with
    classical RK4 at a fixed step ``dt``, recording the energy at every step.

    Args:
        p: weights (:func:`symmetric_single_head`, :func:`orthogonal_multi_head`, :func:`random_counterexample`).
        X0: [S, D]. flow: "sphere" | "free". dt: step size > 0. steps: number of steps.

    Returns:
        :class:`FlowResult`.

    Example:
        >>> import torch
        >>> p = symmetric_single_head(6, beta=2.0, seed=0)
        >>> r = integrate_flow(p, torch.randn(5, 6, dtype=torch.float64), steps=50)
        >>> r.max_increase <= 1e-10
        True
    """
    if not isinstance(p, EnergySA):
        raise TypeError(
            f"p: expected an EnergySA (see the constructors in fastjac.analysis.energy), got {type(p).__name__}"
        )
    if flow not in FLOWS:
        raise ValueError(f"flow: expected one of {FLOWS}, got {flow!r}")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"dt: expected a number > 0, got {dt!r}")
    _int("steps", steps, 0)
    X = _check_state(X0, p.dim).to(p.wq.dtype)
    on_sphere = flow == "sphere"
    unit = lambda Y: Y / Y.norm(dim=-1, keepdim=True)  # noqa: E731
    if on_sphere:
        X = unit(X)
    f = (lambda Y: _proj(Y, sa_heads(p, Y))) if on_sphere else (lambda Y: sa_heads(p, Y))
    xs, es = [X], [energy(p, X).item()]
    with torch.no_grad():
        for _ in range(steps):
            k1 = f(X)
            k2 = f(X + 0.5 * dt * k1)
            k3 = f(X + 0.5 * dt * k2)
            k4 = f(X + dt * k3)
            X = X + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            if on_sphere:
                X = unit(X)
            xs.append(X)
            es.append(energy(p, X).item())
    return FlowResult(torch.arange(steps + 1, dtype=F64) * dt, torch.stack(xs), torch.tensor(es, dtype=F64))


__all__ = [
    "E_multi",
    "E_single",
    "EnergySA",
    "FlowResult",
    "energy",
    "integrate_flow",
    "orthogonal_multi_head",
    "random_counterexample",
    "sa_heads",
    "symmetric_single_head",
]
