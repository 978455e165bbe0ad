"""Matrix-free spectral routines on linear operators given as callables (no dense matrix is ever formed).

Convention: an operator of size n is a callable on a **batch of vectors as rows**, ``matvec(V [b, n]) -> [b, n]``
(row r of the result is A applied to row r of V). With ``shape=(...)`` the rows are handed over reshaped to
``[b, *shape]`` instead (e.g. ``(S, D)`` for a fastjac state, so ``fastjac.linearize``'s ``jvp_fn`` is a matvec
as it stands) and the result may come back in that shape too.

One engine serves all four functions: a **restarted block Krylov method with Rayleigh-Ritz** (block Lanczos with
full reorthogonalisation for symmetric operators and for AᵀA, block Arnoldi for non-symmetric ones). Each cycle
grows an orthonormal basis ``V`` from a start block by repeated application of the operator (every new block
orthogonalised twice against all earlier ones, and rank-revealed, so an exhausted Krylov space ends the run
exactly instead of producing noise), computes Ritz values in ``V`` and restarts from the best Ritz vectors. The
operator's products on the restart block are linear combinations of the ones already computed, so a restart
costs no operator call. The basis, the projected matrices and every reduction are float64 whatever the
operator's dtype; the operator is called in its own ``dtype``.

Convergence is judged on true residuals, never on the change of the values:
``svds``/``power_norm``: ``‖Aᵀu_i − σ_i y_i‖ ≤ tol·σ_1``; ``eigsh``: ``‖A y_i − θ_i y_i‖ ≤ tol·max|θ|``;
``eigs``: ``‖A y_i − λ_i y_i‖ ≤ tol·|λ_1|``, for the k wanted values. ``tol`` is floored at 64 ulps of the
operator's dtype (a float32 operator cannot be resolved below ~1e-5) and at 1e-12. ``iterations`` counts restart cycles; each
cycle applies the operator to about ``(blocks − 1)·block_size`` new vectors.

Everything is deterministic given ``generator`` (a ``torch.Generator`` for the random start block; with None a
fixed seed 0 is used, so repeated calls agree).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import check_int as _check_int
from ._compat import make_generator

F64 = torch.float64
Op = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------------- checks ----


def _check_common(n, k, tol, maxiter, generator, matvecs: Sequence[Tuple[str, object]], shape):
    _check_int("n", n)
    _check_int("k", k)
    if k > n:
        raise ValueError(f"k: asked for {k} values of an operator of size n={n}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol: expected a float > 0, got {tol!r}")
    _check_int("maxiter", maxiter)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    for name, f in matvecs:
        if not callable(f):
            raise TypeError(f"{name}: expected a callable V [b, n] -> [b, n], got {type(f).__name__}")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != n:
            raise ValueError(f"shape: {shape} has {math.prod(shape)} entries, expected n={n}")
    return shape


def _tol_floor(tol: float, dtype: torch.dtype) -> float:
    # below ~1e-12 the float64 basis itself (rank cut 1e-13) cannot resolve residuals
    return max(float(tol), 64 * torch.finfo(dtype).eps, 1e-12)


def _wrap(f: Op, n: int, dtype: torch.dtype, device, shape, name: str) -> Op:
    """float64 rows [c, n] -> operator in its dtype (and shape) -> float64 rows [c, n]."""

    def apply(V: Tensor) -> Tensor:
        Vin = V.to(dtype)
        if shape is not None:
            Vin = Vin.reshape(V.shape[0], *shape)
        out = f(Vin)
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}: must return a tensor, got {type(out).__name__}")
        if out.numel() != V.shape[0] * n:
            raise ValueError(
                f"{name}: given {V.shape[0]} vectors of size {n}, returned shape {tuple(out.shape)}; "
                f"the convention is V [b, n] -> [b, n] (or [b, *shape] with shape=)"
            )
        return out.detach().reshape(V.shape[0], n).to(device=V.device, dtype=F64)

    return apply


# --------------------------------------------------------------------------------------------------- engine ----


def _orth_against(W: Tensor, V: Optional[Tensor], rtol: float = 1e-13) -> Tensor:
    """Orthonormal rows spanning W's rows with V's row space removed (V orthonormal rows); rank-revealing.

    Directions below ``rtol`` of W's largest row are rounding noise of the double projection (float64: ~1e-15);
    a larger cut would throw away the small residual directions that drive convergence near the end.
    """
    ref = W.norm(dim=1).max().clamp_min(1e-300)
    for _ in range(2):  # twice is enough (Kahan-Parlett)
        if V is not None and V.shape[0]:
            W = W - (W @ V.T) @ V
    _, s, Wh = torch.linalg.svd(W, full_matrices=False)
    W = Wh[s > rtol * ref]
    if V is not None and V.shape[0] and W.shape[0]:
        # the SVD divides by small singular values; one more pass keeps V ⟂ W at rounding level
        W = W - (W @ V.T) @ V
        W = torch.linalg.qr(W.T).Q.T
    return W


def _start_block(b: int, n: int, device, generator: Optional[torch.Generator]) -> Tensor:
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    V0 = torch.randn(b, n, generator=g, dtype=F64, device=g.device).to(device)
    return _orth_against(V0, None)


def _krylov(op, n: int, k: int, block: int, blocks: int, maxiter: int, ritz, device, generator):
    """Restarted block Krylov. ``op(V)`` returns a list of products; the first drives the expansion, all are kept
    for ``ritz``.

    ``ritz(V [p, n], P: list of [p, n]) -> (values, restart coefficients [r, p], converged)``.
    Returns (values, converged, cycles).
    """
    V = _start_block(min(block, n), n, device, generator)
    P = op(V)
    vals = None
    for cycle in range(1, maxiter + 1):
        Vs, Ps = [V], [[p] for p in P]
        exhausted = False
        for _ in range(blocks - 1):
            basis = torch.cat(Vs)
            if basis.shape[0] >= n:
                exhausted = True
                break
            W = _orth_against(Ps[0][-1], basis)[: n - basis.shape[0]]
            if W.shape[0] == 0:  # invariant subspace: Ritz values are exact
                exhausted = True
                break
            Vs.append(W)
            for lst, p in zip(Ps, op(W)):
                lst.append(p)
        Vall, Pall = torch.cat(Vs), [torch.cat(lst) for lst in Ps]
        vals, T, done = ritz(Vall, Pall)
        if done or exhausted:
            return vals, True, cycle
        # restart: orthonormalise the coefficient rows (V orthonormal => T V orthonormal iff T's rows are)
        _, s, Wh = torch.linalg.svd(T, full_matrices=False)
        T = Wh[s > 1e-10 * s.max()]
        V, P = T @ Vall, [T @ p for p in Pall]
    return vals, False, maxiter


def _sizes(k: int, n: int, block: Optional[int], ncv: Optional[int]) -> Tuple[int, int]:
    b = min(n, _check_int("block", block) if block is not None else k + 2)
    total = _check_int("ncv", ncv) if ncv is not None else max(2 * k + 2 * b, 20)
    return b, max(2, math.ceil(total / b))


# ------------------------------------------------------------------------------------------------- public ----


def svds(
    matvec: Op,
    rmatvec: Op,
    n: int,
    k: int,
    *,
    dtype: torch.dtype = F64,
    device=None,
    tol: float = 1e-8,
    maxiter: int = 200,
    seed: Optional[Union[int, torch.Generator]] = None,
    shape: Optional[Sequence[int]] = None,
    block: Optional[int] = None,
    ncv: Optional[int] = None,
) -> Tuple[Tensor, bool, int]:
    """Top-k singular values of an n×n operator from products with A and Aᵀ (block Lanczos on AᵀA).

    Ritz values come from the SVD of A·V (not from VᵀAᵀAV), so they keep their relative accuracy even far below
    σ_1. Converged when ``‖Aᵀu_i − σ_i y_i‖ ≤ tol·σ_1`` for i < k.

    Args:
        matvec: ``V [b, n] -> A V`` row-wise ([b, *shape] with ``shape=``). rmatvec: the same for Aᵀ.
        n: operator size. k: how many values. dtype/device: what the operator is called with (basis: float64).
        tol: relative residual (floored at 64 ulps of ``dtype`` and at 1e-12). maxiter: restart cycles.
        seed: an int or a torch.Generator for the random start block. block: block size (default k + 2). ncv: basis size per cycle
        (default max(2k + 2·block, 20)).

    Returns:
        (sigma [k] float64 descending, converged, cycles).

    Example:
        >>> import torch
        >>> from fastjac.linalg import svds
        >>> A = torch.diag(torch.arange(1., 51., dtype=torch.float64))
        >>> s, ok, it = svds(lambda V: V @ A.T, lambda V: V @ A, 50, 3)
        >>> [round(v, 9) for v in s.tolist()], ok
        ([50.0, 49.0, 48.0], True)
    """
    generator = make_generator(seed)
    shape = _check_common(n, k, tol, maxiter, generator, [("matvec", matvec), ("rmatvec", rmatvec)], shape)
    tol = _tol_floor(tol, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    A = _wrap(matvec, n, dtype, device, shape, "matvec")
    At = _wrap(rmatvec, n, dtype, device, shape, "rmatvec")
    b, blocks = _sizes(k, n, block, ncv)

    def op(V):  # AᵀA V drives the expansion; A V is kept for the Ritz values
        AV = A(V)
        return [At(AV), AV]

    def ritz(V, P):
        Z, AV = P
        U, s, _ = torch.linalg.svd(AV, full_matrices=False)  # AV rows = (A V^T)^T; right vectors in V coords = U
        Y = U.T  # [r, p] coefficient rows, descending s
        res = (Y @ Z - (s**2)[:, None] * (Y @ V)).norm(dim=1) / s.clamp_min(1e-300)
        kk = min(k, s.numel())
        done = bool((res[:kk] <= tol * s[0]).all()) or s[0] == 0
        return s, Y[:b], done

    s, ok, it = _krylov(op, n, k, b, blocks, maxiter, ritz, device, generator)
    return KrylovResult(_pad(s[:k], k), ok, it)


def power_norm(
    matvec: Op,
    rmatvec: Op,
    n: int,
    *,
    dtype: torch.dtype = F64,
    device=None,
    tol: float = 1e-8,
    maxiter: int = 200,
    seed: Optional[Union[int, torch.Generator]] = None,
    shape: Optional[Sequence[int]] = None,
) -> Tuple[float, bool, int]:
    """Spectral norm ‖A‖₂ = σ_max by Lanczos on AᵀA (a power iteration accelerated by its Krylov space).

    Plain power iteration converges like (σ_2/σ_1)^(2t); Lanczos like its Chebyshev acceleration, which matters
    for Jacobians whose top singular values are clustered. Same arguments as :func:`svds` with k = 1.

    Returns:
        (norm float, converged, cycles).

    Example:
        >>> import torch
        >>> from fastjac.linalg import power_norm
        >>> A = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> s, ok, _ = power_norm(lambda V: V @ A.T, lambda V: V @ A, 30)
        >>> abs(s - torch.linalg.matrix_norm(A, ord=2).item()) < 1e-10, ok
        (True, True)
    """
    generator = make_generator(seed)
    s, ok, it = svds(
        matvec,
        rmatvec,
        n,
        1,
        dtype=dtype,
        device=device,
        tol=tol,
        maxiter=maxiter,
        seed=generator,
        shape=shape,
        block=2,
        ncv=20,
    )
    return KrylovResult(float(s[0]), ok, it)


class KrylovResult(tuple):
    """What every solver here returns: the 3-tuple ``(values, converged, cycles)``, whatever the flags.

    Attributes ``values``, ``converged`` (bool), ``cycles`` (restart cycles used) and ``vectors`` (eigsh with
    ``vectors=True``: [k, n] float64 orthonormal rows; else None).
    """

    def __new__(cls, values, converged: bool, cycles: int, vectors=None):
        self = super().__new__(cls, (values, converged, cycles))
        self.values, self.converged, self.cycles, self.vectors = values, converged, cycles, vectors
        return self


def eigsh(
    matvec: Op,
    n: int,
    k: int,
    *,
    which: str = "LA",
    vectors: bool = False,
    dtype: torch.dtype = F64,
    device=None,
    tol: float = 1e-8,
    maxiter: int = 200,
    seed: Optional[Union[int, torch.Generator]] = None,
    shape: Optional[Sequence[int]] = None,
    block: Optional[int] = None,
    ncv: Optional[int] = None,
):
    """k extreme eigenvalues (and optionally eigenvectors) of a symmetric operator (block Lanczos, full reorth).

    Args:
        matvec: ``V [b, n] -> A V`` row-wise, A symmetric (only its symmetric part is seen).
        which: "LA" largest algebraic (returned descending), "SA" smallest algebraic (ascending), "LM" largest
            modulus (descending |θ|). Other arguments as :func:`svds`.

    Returns:
        :class:`KrylovResult` ``(values [k] float64, converged, cycles)``; with ``vectors=True`` its ``.vectors``
        holds [k, n] float64 orthonormal rows.

    Example:
        >>> import torch
        >>> from fastjac.linalg import eigsh
        >>> A = torch.diag(torch.linspace(-3, 2, 40, dtype=torch.float64))
        >>> vals, ok, _ = eigsh(lambda V: V @ A, 40, 2, which="LM")
        >>> [round(v, 6) for v in vals.tolist()], ok
        ([-3.0, -2.871795], True)
    """
    generator = make_generator(seed)
    shape = _check_common(n, k, tol, maxiter, generator, [("matvec", matvec)], shape)
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which: expected 'LA', 'SA' or 'LM', got {which!r}")
    tol = _tol_floor(tol, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    A = _wrap(matvec, n, dtype, device, shape, "matvec")
    b, blocks = _sizes(k, n, block, ncv)
    out = {}

    def ritz(V, P):
        (AV,) = P
        H = V @ AV.T
        theta, w = torch.linalg.eigh(0.5 * (H + H.T))
        order = {
            "LA": theta.argsort(descending=True),
            "SA": theta.argsort(),
            "LM": theta.abs().argsort(descending=True),
        }[which]
        theta, Y = theta[order], w[:, order].T
        res = (Y @ AV - theta[:, None] * (Y @ V)).norm(dim=1)
        kk = min(k, theta.numel())
        scale = theta.abs().max().clamp_min(1e-300)
        out["vec"] = Y[:k] @ V
        return theta, Y[:b], bool((res[:kk] <= tol * scale).all())

    vals, ok, it = _krylov(lambda V: [A(V)], n, k, b, blocks, maxiter, ritz, device, generator)
    vals = _pad(vals[:k], k)
    return KrylovResult(vals, ok, it, out["vec"] if vectors else None)


def eigs(
    matvec: Op,
    n: int,
    k: int,
    *,
    dtype: torch.dtype = F64,
    device=None,
    tol: float = 1e-8,
    maxiter: int = 200,
    seed: Optional[Union[int, torch.Generator]] = None,
    shape: Optional[Sequence[int]] = None,
    block: Optional[int] = None,
    ncv: Optional[int] = None,
) -> Tuple[Tensor, bool, int]:
    """k eigenvalues of largest modulus of a real non-symmetric operator (restarted block Arnoldi).

    Restarts keep the real and imaginary parts of the wanted Ritz vectors (a real basis of the same invariant
    subspace for a conjugate pair), so the iteration stays in real arithmetic. For strongly non-normal operators
    eigenvalues are ill-conditioned by nature: expect their error to be the residual times the condition number.

    Returns:
        (eigenvalues [k] complex128, by descending modulus, converged, cycles).

    Example:
        >>> import torch
        >>> from fastjac.linalg import eigs
        >>> R = torch.tensor([[0., -1.], [1., 0.]], dtype=torch.float64)        # eigenvalues ±i
        >>> A = torch.block_diag(2 * R, torch.diag(torch.arange(1., 21., dtype=torch.float64) / 20))
        >>> lam, ok, _ = eigs(lambda V: V @ A.T, 22, 2)
        >>> sorted(round(v, 9) for v in lam.imag.tolist()), ok
        ([-2.0, 2.0], True)
    """
    generator = make_generator(seed)
    shape = _check_common(n, k, tol, maxiter, generator, [("matvec", matvec)], shape)
    tol = _tol_floor(tol, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    A = _wrap(matvec, n, dtype, device, shape, "matvec")
    b, blocks = _sizes(k, n, block, ncv)

    def ritz(V, P):
        (AV,) = P
        H = V @ AV.T  # H[i, j] = v_i · A v_j, i.e. Vᵀ A V in column terms
        lam, w = torch.linalg.eig(H)  # column j of w: coefficients c with (Vᵀ A V) c = λ c
        order = lam.abs().argsort(descending=True)
        lam, Y = lam[order], w[:, order].T  # [p] complex, [p, p] complex rows
        Vc, AVc = V.to(Y.dtype), AV.to(Y.dtype)
        res = (Y @ AVc - lam[:, None] * (Y @ Vc)).norm(dim=1)
        kk = min(k, lam.numel())
        done = bool((res[:kk] <= tol * lam.abs()[0].clamp_min(1e-300)).all())
        keep = Y[:b]
        return lam, torch.cat([keep.real, keep.imag]), done

    lam, ok, it = _krylov(lambda V: [A(V)], n, k, b, blocks, maxiter, ritz, device, generator)
    return KrylovResult(_pad(lam[:k], k), ok, it)


def _pad(x: Tensor, k: int) -> Tensor:
    # an exhausted Krylov space of an operator of rank < k: the missing values are exactly 0
    return x if x.numel() >= k else torch.cat([x, x.new_zeros(k - x.numel())])


__all__ = ["KrylovResult", "eigs", "eigsh", "power_norm", "svds"]
