"""The oscillation example of the paper's section 5: a rotation generator Ω (anti-symmetric) as a discrete step,

    without normalisation:  X' = X + η X Ωᵀ            (each token x ← (I + ηΩ) x)
    with normalisation:     X' = Π(X + η X Ωᵀ)          (Π: every token onto the unit sphere)

The Jacobian of the first is I ⊗ (I + ηΩ), whose eigenvalues ``1 ± iηω_k`` (ω_k the rotation frequencies of Ω)
have modulus ``sqrt(1 + η²ω_k²) > 1``: outside the unit circle, an unstable oscillation. The sphere normalisation
divides by ‖(I + ηΩ)x‖ ≥ ‖x‖ and removes the radial direction. When every normalisation group rotates at one
frequency (``group=2`` with a block-diagonal Ω from :func:`rotation_generator`, the oscillator picture: each
oscillator a point on its circle) the group norm grows by exactly sqrt(1 + η²ω²): the tangent map is an isometry
(singular value exactly 1: critical, the Lyapunov exponent is 0), its eigenvalue is cos(arctan ηω) ≤ 1 (inside,
close to the circle; the tangent lines at X and X' differ by the rotation angle) and the radial one is 0. With one norm over a group that mixes
frequencies the pull is only partial: a generic Ω with ``group=D`` leaves eigenvalues outside the circle (seen:
max modulus 2.03 normalised vs 2.37 unnormalised, D = 8, η = 0.5).

``OscillatorStep`` is a plain callable ``X -> X`` (an nn.Module), so every fastjac function applies
(``fastjac.jacobian``, ``fastjac.analysis.spectra.eigvals``) through torch.func.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .._compat import make_generator

F64 = torch.float64


def random_antisymmetric(
    dim: int, *, std: float = 1.0, seed: Optional[Union[int, torch.Generator]] = None, dtype=F64
) -> Tensor:
    """A random anti-symmetric Ω = (W − Wᵀ)/2, W Gaussian with std ``std``. [dim, dim].

    Example:
        >>> O = random_antisymmetric(4, seed=0)
        >>> torch.allclose(O, -O.T)
        True
    """
    generator = make_generator(seed)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    W = std * torch.randn(dim, dim, generator=g, dtype=F64)
    return (0.5 * (W - W.T)).to(dtype)


def rotation_generator(freqs) -> Tensor:
    """Block-diagonal Ω with 2×2 blocks [[0, −ω], [ω, 0]] for the given frequencies. [2K, 2K].

    Example:
        >>> rotation_generator([1.0, 2.0]).shape
        torch.Size([4, 4])
    """
    w = torch.as_tensor(freqs, dtype=F64).reshape(-1)
    blocks = [torch.tensor([[0.0, -float(x)], [float(x), 0.0]], dtype=F64) for x in w]
    return torch.block_diag(*blocks)


class OscillatorStep(nn.Module):
    """One step ``X' = X + η X Ωᵀ``, followed by the per-token sphere projection when ``normalize=True``.

    Args:
        omega: [D, D] anti-symmetric. eta: step size. normalize: project onto the unit sphere, per group of
        ``group`` consecutive features (default D: whole tokens; 2: planar oscillators).
    X: [S, D] or [B, S, D] -> same shape.

    Example:
        >>> import fastjac as fj
        >>> step = OscillatorStep(rotation_generator([1.0]), eta=0.5, normalize=False)
        >>> lam = torch.linalg.eigvals(fj.jacobian(step, torch.randn(3, 2, dtype=torch.float64)))
        >>> [round(v, 6) for v in sorted(set(lam.abs().tolist()))]
        [1.118034]
    """

    def __init__(self, omega: Tensor, eta: float = 0.1, normalize: bool = True, group: Optional[int] = None):
        super().__init__()
        if not isinstance(omega, Tensor) or omega.dim() != 2 or omega.shape[0] != omega.shape[1]:
            raise ValueError(f"omega: expected a square [D, D] tensor, got {getattr(omega, 'shape', type(omega))}")
        if not torch.allclose(omega, -omega.T, atol=1e-12 * max(1.0, omega.abs().max().item())):
            raise ValueError("omega: expected an anti-symmetric matrix (omega == -omega.T)")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
            raise ValueError(f"eta: expected a number > 0, got {eta!r}")
        D = omega.shape[0]
        group = D if group is None else group
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or D % group:
            raise ValueError(f"group: expected an int dividing D={D}, got {group!r}")
        self.group = group
        self.register_buffer("omega", omega)
        self.eta, self.normalize, self.dim = float(eta), bool(normalize), omega.shape[0]

    def forward(self, X: Tensor) -> Tensor:
        if X.shape[-1] != self.dim:
            raise ValueError(f"X: last dimension {X.shape[-1]} does not match omega's {self.dim}")
        Z = X + self.eta * X @ self.omega.T
        if not self.normalize:
            return Z
        Zg = Z.unflatten(-1, (-1, self.group))
        return (Zg / Zg.norm(dim=-1, keepdim=True)).flatten(-2)

    def predicted_eigenvalues(self) -> Tensor:
        """The unnormalised step's eigenvalues 1 + η·λ(Ω) = 1 ± iηω (each repeated S times in the Jacobian). [D]."""
        return 1 + self.eta * torch.linalg.eigvals(self.omega.to(F64))


__all__ = ["OscillatorStep", "random_antisymmetric", "rotation_generator"]
