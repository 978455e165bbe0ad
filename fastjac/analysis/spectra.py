"""Spectra of the one-step Jacobian (docs/design.md section 3): eigenvalues, spectral norms and the Prop 5.1 bound.

Two linear maps can be analysed at a state X:

- ``part="step"``: ``J_step = ∂step(X, C)/∂X`` through ``fastjac.linearize`` / ``fastjac.vjp`` (analytic for
  fastjac models, torch.func for any callable);
- ``part="msa"``: ``J_MSA = ∂MSA/∂X`` alone (C does not enter it). For fastjac models it comes from the analytic
  attention ops (``fastjac.ops.msa_cache`` / ``msa_jvp`` / ``msa_vjp`` / ``msa_jacobian_rows``); any other object
  with a callable ``.msa(X)`` is differentiated by torch.func.

Small problems go dense (``fastjac.jacobian`` + ``torch.linalg``); large ones matrix-free through
:mod:`fastjac.linalg` (block Lanczos on JᵀJ, block Arnoldi on J), so S·D can be far beyond a dense matrix. Batched X
[B, S, D] gives per-sample results (one linearisation per sample).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import linalg
from .._compat import make_generator
from ..linearization import Linearization, linearization, prepare
from ..models import ItrSA

F64 = torch.float64
PARTS = ("step", "msa")
# eigvals with k given goes dense up to this S*D (a dense eig of 1024^2 takes well under a second)
DENSE_EIG_MAX_N = 1024
# eigvals with k=None and method="auto" refuses a dense eig above this S*D (O(n^3): about 75 s at n = 5184 and
# ~10 min at n = 10240 on 2 CPU cores); method="dense" insists
DENSE_EIG_AUTO_LIMIT = 4096


# ----------------------------------------------------------------------------------------- linear operators ----


@dataclass
class LinearOp:
    """A Jacobian at one sample as a matrix-free operator on rows ``V [b, n]`` (n = S·D), and densely on request.

    ``out`` is the map's value at X ([S, D]); ``shape`` is (S, D); ``dense()`` is [n, n] token-major;
    ``linearization`` the one :class:`fastjac.Linearization` all three products use.
    """

    matvec: Callable[[Tensor], Tensor]
    rmatvec: Callable[[Tensor], Tensor]
    dense: Callable[[], Tensor]
    out: Tensor
    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    linearization: Optional[Linearization] = None

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]


def _rows(fn: Callable[[Tensor], Tensor], shape) -> Callable[[Tensor], Tensor]:
    # linalg hands rows [b, n]; the Jacobian functions want tangents [b, S, D]
    return lambda V: fn(V.reshape(V.shape[0], *shape)).reshape(V.shape[0], -1)


def _check_part(part) -> str:
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    return part


def _op(lin: Linearization) -> LinearOp:
    """The operator view of one linearisation at one sample [S, D]: matvec, rmatvec and dense share its forward."""
    S, D = lin.X.shape
    return LinearOp(
        _rows(lin.jvp, (S, D)), _rows(lin.vjp, (S, D)), lin.dense, lin.out, (S, D), lin.X.dtype, lin.X.device, lin
    )


def linear_operator(
    step, X: Tensor, *, C: Optional[Tensor] = None, part: str = "step", backend: str = "auto"
) -> LinearOp:
    """The Jacobian of one step (``part="step"``) or of MSA alone (``part="msa"``) at one state X [S, D].

    Example:
        >>> import fastjac as fj, torch
        >>> from fastjac.analysis.spectra import linear_operator
        >>> op = linear_operator(fj.ItrSA(8, 2), torch.randn(5, 8), part="msa")
        >>> op.matvec(torch.randn(3, 40)).shape, op.dense().shape
        (torch.Size([3, 40]), torch.Size([40, 40]))
    """
    _check_part(part)
    if isinstance(X, Tensor) and X.dim() == 3:
        raise ValueError(f"X: linear_operator takes one sample [S, D], got {tuple(X.shape)}")
    return _op(linearization(step, X, C=C, backend=backend, part=part))


def _samples(step, X: Tensor, C: Optional[Tensor]) -> Tuple[Iterator[Tuple[Tensor, Optional[Tensor]]], bool]:
    """Validate once, then the samples (X_b [S, D], C_b) one by one."""
    X3, C3, batched = prepare(step, X, C)
    Cs = [None if C3 is None else (C3 if C3.dim() == 2 else C3[b]) for b in range(X3.shape[0])]
    return iter(zip(X3.unbind(0), Cs)), batched


def _no_grad(samples):
    # analysis results are numbers, not graph nodes: the model's parameters must not drag autograd along
    for s in samples:
        with torch.no_grad():
            yield s


def _check_opt_int(name: str, v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int or None, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def _warn_unconverged(what: str, it: int) -> None:
    warnings.warn(
        f"{what}: the Krylov iteration did not reach tol in {it} restart cycles; the result is the "
        f"best estimate (raise maxiter or tol)",
        RuntimeWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------- eigenvalues ----


def eigvals(
    step,
    X: Tensor,
    *,
    C: Optional[Tensor] = None,
    k: Optional[int] = None,
    part: str = "step",
    method: str = "auto",
    backend: str = "auto",
    tol: float = 1e-8,
    maxiter: int = 300,
    seed: Optional[Union[int, torch.Generator]] = None,
) -> Tensor:
    """Eigenvalues of the one-step Jacobian (or of J_MSA), by descending modulus.

    Args:
        step: a fastjac model or any callable X -> X (``part="msa"``: a fastjac model or an object with ``.msa``).
        X: state [S, D] or [B, S, D]. C: injected input (X's shape, [S, D] or None).
        k: how many, largest modulus first; None = all S·D (dense).
        part: "step" (J_step) or "msa" (J_MSA = ∂MSA/∂X).
        method: "dense" (``torch.linalg.eigvals`` of the dense Jacobian), "arnoldi" (matrix-free, k JVPs per block
            on a shared forward pass, :func:`fastjac.linalg.eigs`), or "auto": dense when k is None or
            S·D ≤ 1024, Arnoldi otherwise. "auto" with k=None refuses S·D > 4096 (a dense eig is O(n³):
            minutes there) with the estimate; pass k, or method="dense" to insist.
        backend: as for ``fastjac.jvp``. tol, maxiter, seed: for Arnoldi (an int or a torch.Generator) (see :mod:`fastjac.linalg`).

    Returns:
        complex [k] (or [S·D]); [B, k] for batched X. The dtype is complex128 for Arnoldi and the complex type of X
        for dense. A RuntimeWarning is raised when Arnoldi stops at maxiter.

    Example:
        >>> import fastjac as fj, torch
        >>> _ = torch.manual_seed(0)
        >>> m = fj.ItrSA(16, 2).double()
        >>> X = torch.randn(9, 16, dtype=torch.float64)
        >>> lam = eigvals(m, X)                                   # all 144, dense
        >>> top = eigvals(m, X, k=4, method="arnoldi")            # matrix-free
        >>> torch.allclose(top.abs(), lam.abs()[:4].to(top.real.dtype), atol=1e-6)
        True
    """
    generator = make_generator(seed)
    _check_part(part)
    k = _check_opt_int("k", k)
    if method not in ("auto", "dense", "arnoldi"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'arnoldi', got {method!r}")
    samples, batched = _samples(step, X, C)
    n = X.shape[-2] * X.shape[-1]
    if k is not None and k > n:
        raise ValueError(f"k: asked for {k} eigenvalues of an S*D = {n} dimensional Jacobian")
    if method == "arnoldi" and k is None:
        raise ValueError("k: method='arnoldi' needs k (the number of eigenvalues of largest modulus)")
    dense = method == "dense" or (method == "auto" and (k is None or n <= DENSE_EIG_MAX_N))
    if dense and method == "auto" and n > DENSE_EIG_AUTO_LIMIT:
        B = X.shape[0] if X.dim() == 3 else 1
        secs = B * 75.0 * (n / 5184) ** 3
        raise ValueError(
            f"k: all S*D = {n} eigenvalues need a dense eig of a [{n}, {n}] matrix per sample "
            f"({n * n * X.element_size() / 1e9:.2f} GB, O(n^3): about {secs / 60:.0f} min on 2 CPU "
            f"cores); pass k (the k eigenvalues of largest modulus, matrix-free Arnoldi) or "
            f"method='dense' to insist"
        )
    out = []
    for Xb, Cb in _no_grad(samples):
        op = _op(linearization(step, Xb, C=Cb, part=part, backend=backend, check=False))
        if dense:
            lam = torch.linalg.eigvals(op.dense())
            lam = lam[lam.abs().argsort(descending=True)]
            out.append(lam if k is None else lam[:k])
        else:
            lam, ok, it = linalg.eigs(
                op.matvec, n, k, dtype=op.dtype, device=op.device, tol=tol, maxiter=maxiter, seed=generator
            )
            if not ok:
                _warn_unconverged("eigvals", it)
            out.append(lam)
    return torch.stack(out) if batched else out[0]


# -------------------------------------------------------------------------------------------- spectral norm ----


def spectral_norm(
    step,
    X: Tensor,
    *,
    C: Optional[Tensor] = None,
    part: str = "step",
    method: str = "lanczos",
    backend: str = "auto",
    tol: float = 1e-8,
    maxiter: int = 200,
    seed: Optional[Union[int, torch.Generator]] = None,
):
    """‖J‖₂, the largest singular value of the one-step Jacobian (or of J_MSA).

    Args:
        method: "lanczos" (default; matrix-free Lanczos on JᵀJ from JVPs and VJPs, :func:`fastjac.linalg.power_norm`,
            any S·D) or "dense" (``torch.linalg.matrix_norm(ord=2)`` of the dense Jacobian, small S·D).
        Others as for :func:`eigvals`.

    Returns:
        a float64 tensor: 0-dim for X [S, D], [B] for X [B, S, D].

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2).double()
        >>> X = torch.randn(9, 16, dtype=torch.float64)
        >>> a = spectral_norm(m, X, part="msa")
        >>> b = spectral_norm(m, X, part="msa", method="dense")
        >>> bool(abs(a - b) < 1e-8 * b)
        True
    """
    generator = make_generator(seed)
    _check_part(part)
    if method not in ("lanczos", "dense"):
        raise ValueError(f"method: expected 'lanczos' or 'dense', got {method!r}")
    samples, batched = _samples(step, X, C)
    out = []
    for Xb, Cb in _no_grad(samples):
        op = _op(linearization(step, Xb, C=Cb, part=part, backend=backend, check=False))
        if method == "dense":
            out.append(torch.linalg.matrix_norm(op.dense().to(F64), ord=2).item())
        else:
            s, ok, it = linalg.power_norm(
                op.matvec, op.rmatvec, op.n, dtype=op.dtype, device=op.device, tol=tol, maxiter=maxiter, seed=generator
            )
            if not ok:
                _warn_unconverged("spectral_norm", it)
            out.append(s)
    res = torch.tensor(out, dtype=F64)
    return res if batched else res[0]


# ---------------------------------------------------------------------------------------------- Prop 5.1 ----


@dataclass
class Prop51Result:
    """Prop 5.1 next to the measured norm: float64 tensors, 0-dim for one sample and [B] for a batch (``holds``: bool).

    measured: ‖J_step‖₂. bound: gamma_max / R · (1 + eta · msa_norm). ratio: measured / bound (≤ 1 when the bound
    holds; how far below 1 says how tight it is). holds: measured ≤ bound (up to the iteration's tolerance).
    gamma_max: max_j |γ_j| (times √N for "rms"). R: min over tokens and norm groups of the l2 size
    sqrt(‖z‖² + eps) of Z = X + η (C + MSA(X)). msa_norm: ‖J_MSA‖₂. eta: the model's step size.
    """

    measured: object
    bound: object
    ratio: object
    holds: object
    gamma_max: object
    R: object
    msa_norm: object
    eta: object

    def to_dict(self) -> dict:
        conv = lambda v: v.tolist() if isinstance(v, Tensor) else v  # noqa: E731
        return {k: conv(v) for k, v in asdict(self).items()}


def prop51_bound(
    step,
    X: Tensor,
    *,
    C: Optional[Tensor] = None,
    backend: str = "auto",
    tol: float = 1e-10,
    maxiter: int = 200,
    seed: Optional[Union[int, torch.Generator]] = None,
) -> Prop51Result:
    """The Prop 5.1 bound ``‖J_step‖₂ ≤ max_j|γ_j| / R · (1 + η ‖J_MSA‖₂)`` evaluated, next to ‖J_step‖₂ measured.

    Applies to ItrSA with ``norm="l2"`` (the paper's RMSNorm) and ``norm="rms"`` (the same map with γ scaled by √N
    and eps by N, so gamma_max includes √N). The step Jacobian is ``N(Z) (I + η J_MSA)`` and the l2 norm's
    Jacobian at a group z is ``diag(γ) (I/n − z zᵀ/n³)``, n = sqrt(‖z‖² + eps), of norm ≤ max|γ| / n. With
    ``norm_group`` N < D that Jacobian is block-diagonal over the D/N groups of every token, so R is the minimum
    over tokens *and groups* of n (per-group R); for N = D it is the paper's min token norm. eps only makes n
    larger than ‖z‖, so the bound with n is exact and slightly tighter than with ‖z‖.

    Refused (ValueError): ``norm="layer"`` (the centring makes the norm Jacobian depend on the mean, outside the
    proposition), ``norm="none"`` (no normalisation, nothing to bound) and AKOrN (a different step: rotation and
    tangent projection inside the sphere normalisation). Both norms are computed matrix-free (Lanczos), so any
    S·D works.

    Returns:
        :class:`Prop51Result` (``.to_dict()`` for JSON).

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(16, 2, norm="l2").double()
        >>> r = prop51_bound(m, torch.randn(9, 16, dtype=torch.float64))
        >>> bool(r.holds), bool(0 < r.ratio <= 1)
        (True, True)
    """
    generator = make_generator(seed)
    model = step
    if not isinstance(model, ItrSA):
        raise TypeError(
            f"step: Prop 5.1 is stated for the ItrSA step Norm(X + eta (C + MSA(X))); got {type(model).__name__}"
        )
    if model.norm not in ("l2", "rms"):
        raise ValueError(
            f"step: Prop 5.1 applies to norm='l2' (and 'rms', the same up to scale), not "
            f"norm={model.norm!r}: "
            + (
                "LayerNorm's centring is outside the proposition"
                if model.norm == "layer"
                else "there is no normalisation"
            )
        )
    samples, batched = _samples(model, X, C)
    N = model.norm_group
    with torch.no_grad():
        gmax = model.gamma.detach().abs().max().item() * (math.sqrt(N) if model.norm == "rms" else 1.0)
        eps_l2 = model.eps * (N if model.norm == "rms" else 1.0)
        eta = float(model.eta)
    rows = []
    for Xb, Cb in samples:
        with torch.no_grad():
            F = model.msa(Xb) if Cb is None else Cb + model.msa(Xb)
            Z = (Xb + eta * F).to(F64)
            R = torch.sqrt((Z.unflatten(-1, (-1, N)) ** 2).sum(-1) + eps_l2).min().item()
        kw = dict(backend=backend, tol=tol, maxiter=maxiter, seed=generator)
        msa_n = spectral_norm(model, Xb, part="msa", **kw)
        meas = spectral_norm(model, Xb, C=Cb, part="step", **kw)
        bound = gmax / R * (1 + abs(eta) * msa_n)
        slack = 1 + 100 * max(tol, 64 * torch.finfo(Xb.dtype).eps)
        rows.append((meas, bound, meas / bound, meas <= bound * slack, R, msa_n))
    cols = list(zip(*rows))
    one = (lambda t: t) if batched else (lambda t: t[0])  # noqa: E731
    t = lambda i: one(torch.tensor([float(v) for v in cols[i]], dtype=F64))  # noqa: E731
    holds = one(torch.tensor([bool(v) for v in cols[3]]))
    return Prop51Result(
        t(0), t(1), t(2), holds, torch.tensor(gmax, dtype=F64), t(4), t(5), torch.tensor(eta, dtype=F64)
    )


__all__ = ["LinearOp", "Prop51Result", "eigvals", "linear_operator", "prop51_bound", "spectral_norm"]
