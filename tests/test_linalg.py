"""fastjac.linalg against dense torch.linalg on random matrices with known spectra.

Tolerances: the routines stop at a relative residual tol (1e-10 here); for a symmetric/singular-value problem the
value error is at most the residual (and usually its square over the gap), so 1e-8 relative is safe. Non-normal
eigenvalues are ill-conditioned (error ~ residual x condition number): 1e-6 there.
"""

from __future__ import annotations

import pytest
import torch

from fastjac.linalg import eigs, eigsh, power_norm, svds

F64 = torch.float64


def _orth(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q


def _with_singular_values(s, g):
    n = s.numel()
    return _orth(n, g) @ torch.diag(s) @ _orth(n, g).T


def _ops(A):
    return (lambda V: V @ A.T), (lambda V: V @ A)


def _match(computed, expected):
    """max over expected of the distance to the nearest computed value (robust to order among equal moduli)."""
    d = (expected[:, None] - computed[None, :]).abs()
    return d.min(dim=1).values.max().item()


@pytest.mark.parametrize("n,k", [(7, 3), (63, 5), (200, 6)])
def test_svds_random_known_spectrum(n, k):
    g = torch.Generator().manual_seed(n)
    s = torch.rand(n, generator=g, dtype=F64).sort(descending=True).values * 3
    A = _with_singular_values(s, g)
    got, ok, _ = svds(*_ops(A), n, k, tol=1e-10, seed=torch.Generator().manual_seed(1))
    assert ok and got.dtype == F64 and got.shape == (k,)
    ref = torch.linalg.svdvals(A)[:k]
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)
    assert torch.all(got[:-1] >= got[1:])


def test_svds_clustered_and_near_degenerate():
    g = torch.Generator().manual_seed(3)
    n = 150
    s = torch.cat(
        [torch.tensor([5.0, 5.0 - 1e-7, 5.0 - 2e-7, 4.99, 4.99], dtype=F64), torch.linspace(4.9, 0.0, n - 5, dtype=F64)]
    )
    A = _with_singular_values(s, g)
    got, ok, _ = svds(*_ops(A), n, 5, tol=1e-10)
    assert ok
    torch.testing.assert_close(got, s[:5], rtol=1e-9, atol=0)


def test_svds_low_rank_and_tiny_n():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(40, 2, generator=g, dtype=F64) @ torch.randn(2, 40, generator=g, dtype=F64)  # rank 2
    got, ok, _ = svds(*_ops(A), 40, 4)
    assert ok
    torch.testing.assert_close(got, torch.linalg.svdvals(A)[:4], rtol=1e-8, atol=1e-8)
    A1 = torch.tensor([[-3.0]], dtype=F64)
    assert svds(*_ops(A1), 1, 1)[0].item() == pytest.approx(3.0)


def test_power_norm_matches_matrix_norm_and_float32_operator():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(120, 120, generator=g, dtype=F64)
    nrm, ok, _ = power_norm(*_ops(A), 120, tol=1e-11)
    assert ok and nrm == pytest.approx(torch.linalg.matrix_norm(A, ord=2).item(), rel=1e-10)
    A32 = A.float()
    nrm32, ok32, _ = power_norm(*_ops(A32), 120, dtype=torch.float32)
    assert ok32 and nrm32 == pytest.approx(torch.linalg.matrix_norm(A, ord=2).item(), rel=1e-5)


def test_shaped_operator_and_determinism():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(35, 35, generator=g, dtype=F64)
    shaped = lambda V: (V.reshape(V.shape[0], 35) @ A.T).reshape(V.shape)  # noqa: E731 - V [b, 5, 7]
    assert shaped(torch.zeros(2, 5, 7, dtype=F64)).shape == (2, 5, 7)
    shaped_t = lambda V: (V.reshape(V.shape[0], 35) @ A).reshape(V.shape)  # noqa: E731
    r1 = svds(shaped, shaped_t, 35, 3, shape=(5, 7), seed=torch.Generator().manual_seed(9))
    r2 = svds(shaped, shaped_t, 35, 3, shape=(5, 7), seed=torch.Generator().manual_seed(9))
    assert torch.equal(r1[0], r2[0]) and r1[2] == r2[2]
    torch.testing.assert_close(r1[0], torch.linalg.svdvals(A)[:3], rtol=1e-8, atol=0)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_extremes_and_vectors(which):
    g = torch.Generator().manual_seed(7)
    n = 90
    lam = torch.cat([torch.tensor([4.0, 4.0 - 1e-8, -4.5], dtype=F64), torch.linspace(-3, 3, n - 3, dtype=F64)])
    Q = _orth(n, g)
    A = Q @ torch.diag(lam) @ Q.T
    res = eigsh(lambda V: V @ A, n, 3, which=which, vectors=True, tol=1e-11)
    vals, vecs, ok = res.values, res.vectors, res.converged
    assert ok
    ref = torch.linalg.eigvalsh(A)
    expected = {"LA": ref.flip(0)[:3], "SA": ref[:3], "LM": ref[ref.abs().argsort(descending=True)][:3]}[which]
    torch.testing.assert_close(vals, expected, rtol=1e-9, atol=1e-9)
    # eigenvectors: orthonormal and A y = θ y
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(3, dtype=F64), atol=1e-10, rtol=0)
    assert ((vecs @ A - vals[:, None] * vecs).norm(dim=1) < 1e-8).all()


def test_eigs_random_nonsymmetric():
    g = torch.Generator().manual_seed(8)
    n = 120
    A = torch.randn(n, n, generator=g, dtype=F64) / n**0.5
    A[:6, :6] += 2 * torch.randn(6, 6, generator=g, dtype=F64)  # a few separated outliers, complex pairs
    lam, ok, _ = eigs(lambda V: V @ A.T, n, 4, tol=1e-11)
    assert ok and lam.dtype == torch.complex128
    ref = torch.linalg.eigvals(A)
    ref = ref[ref.abs().argsort(descending=True)]
    torch.testing.assert_close(lam.abs(), ref.abs()[:4], rtol=1e-8, atol=0)
    assert _match(lam, ref[:4]) < 1e-8


def test_eigs_non_normal_with_known_eigenvalues():
    g = torch.Generator().manual_seed(9)
    n = 60
    lam_true = torch.cat([torch.tensor([3.0, -2.5, 2.0], dtype=F64), torch.linspace(-1, 1, n - 3, dtype=F64)])
    T = torch.diag(lam_true) + torch.triu(torch.randn(n, n, generator=g, dtype=F64), 1) * 0.3  # non-normal
    Sm = torch.eye(n, dtype=F64) + 0.2 * torch.randn(n, n, generator=g, dtype=F64)
    A = Sm @ T @ torch.linalg.inv(Sm)
    assert (A @ A.T - A.T @ A).abs().max() > 1.0  # really non-normal
    lam, ok, _ = eigs(lambda V: V @ A.T, n, 3, tol=1e-11, maxiter=400)
    assert ok
    assert _match(lam, lam_true[:3].to(torch.complex128)) < 1e-6
    dense = torch.linalg.eigvals(A)
    assert _match(lam, dense[dense.abs().argsort(descending=True)][:3]) < 1e-6


def test_eigs_exhausted_small_operator_is_exact():
    A = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]], dtype=F64)
    lam, ok, _ = eigs(lambda V: V @ A.T, 3, 3)
    assert ok
    assert _match(lam, torch.tensor([1j, -1j, 0.5], dtype=torch.complex128)) < 1e-12


def test_bad_arguments_name_the_argument():
    A = torch.eye(4, dtype=F64)
    mv, rmv = _ops(A)
    with pytest.raises(ValueError, match="k:"):
        svds(mv, rmv, 4, 5)
    with pytest.raises(TypeError, match="rmatvec"):
        svds(mv, None, 4, 1)
    with pytest.raises(ValueError, match="tol"):
        power_norm(mv, rmv, 4, tol=0)
    with pytest.raises(ValueError, match="which"):
        eigsh(mv, 4, 1, which="XX")
    with pytest.raises(ValueError, match="shape"):
        eigs(mv, 4, 1, shape=(3, 2))
    with pytest.raises(TypeError, match="seed"):
        eigs(mv, 4, 1, seed="1")
    with pytest.raises(ValueError, match="matvec"):
        eigs(lambda V: V[:, :2], 4, 1)
    with pytest.raises(TypeError, match="n:"):
        eigsh(mv, 4.0, 1)
