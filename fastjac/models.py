"""The recurrent steps fastjac knows analytically: the public base :class:`RecurrentStep`, ItrSA and AKOrN.

One call is one step; ``unroll`` iterates it. Everything fastjac needs from a model beyond its forward lives on the
model (its analytic linearisation, trivial-exponent count, radial basis, config), so a new model is its class plus
its op files: subclass :class:`RecurrentStep`, and every fastjac function takes its analytic path. Any other
callable ``X -> X`` goes through torch.func.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ._checks import check_int as _check_int
from ._checks import check_number, check_tensor
from .ops._utils import group
from .ops.akorn import omega_apply, proj_forward
from .ops.attention import AttnParams, msa_cache, msa_forward, msa_jacobian_rows, msa_jvp, msa_vjp
from .ops.base import BatchedLinearization
from .ops.norm import NORMS, NormParams, norm_forward
from .ops.step import AKOrNLinearization, AKOrNParams, ItrSALinearization, ItrSAParams


class RecurrentStep(nn.Module):
    """Base class of the steps fastjac linearises analytically. ``step(X, C=None) -> X'``, X [S, D] or [B, S, D].

    A subclass provides:

    - ``dim`` (int, D) and its parameters (their dtype and device are the model's);
    - ``forward(X, C=None)``: the plain forward (the ``"autograd"`` oracle differentiates exactly this);
    - ``linearize_analytic(X [B, S, D], C [B, S, D] | [S, D] | None) -> BatchedLinearization``: the analytic
      linearisation in torch ops (``backend="torch"``). A subclass that overrides ``forward`` must override this
      too: otherwise the torch backend refuses it rather than return its parent's Jacobian;
    - optionally ``trivial_count(S, D)`` (how many exponents normalisation makes -inf; default 0),
      ``radial_basis(X)`` (directions a normalised state cannot move in; default None), ``config()`` (the
      constructor arguments, JSON-ready, for save_model/load_model and checkpoint fingerprints).

    Kernel backends (Triton, C++) register their linearisation per exact class
    (``fastjac.backends.register_linearizer``), so a subclass never silently gets its parent's kernels.

    Example:
        >>> import fastjac as fj
        >>> isinstance(fj.ItrSA(8, 2), fj.RecurrentStep)
        True
    """

    dim: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def linearize_analytic(self, X: Tensor, C: Optional[Tensor] = None) -> BatchedLinearization:
        raise NotImplementedError(f"{type(self).__name__} does not define linearize_analytic")

    def trivial_count(self, S: int, D: int) -> int:
        """How many of the S*D Lyapunov exponents are -inf by construction (directions the step maps to 0)."""
        return 0

    def radial_basis(self, X: Tensor) -> Optional[Tensor]:
        """Orthonormal per-group directions a normalised state cannot move in, [B, S, G, r, N]; None if none."""
        return None

    def config(self) -> Dict[str, Any]:
        return dict(getattr(self, "_config", {}))

    def check_state(self, X: Tensor, name: str = "X") -> None:
        """X's last dim, dtype and device must match the model's (ValueError/TypeError naming ``name``)."""
        if X.shape[-1] != self.dim:
            raise ValueError(f"{name}: last dimension {X.shape[-1]} does not match the model's dim={self.dim}")
        if X.dtype != self.dtype:
            raise TypeError(
                f"{name}: dtype {X.dtype} does not match the model's {self.dtype}; use "
                f"model.to({X.dtype}) or {name}.to({self.dtype})"
            )
        if X.device != self.device:
            raise ValueError(f"{name}: device {X.device} does not match the model's {self.device}; move one of them")

    def check_parameters(self) -> None:
        """Every parameter and buffer finite (under fastjac.config.check_finite), and the float hyperparameters
        (``beta``, ``eps``) too: NaN or inf weights would give NaN Jacobians with errors about other arguments."""
        for pname, prm in list(self.named_parameters()) + list(self.named_buffers()):
            if prm.is_floating_point() or prm.is_complex():
                check_tensor(f"{type(self).__name__}.{pname}", prm.detach())
        for attr in ("beta", "eps"):
            v = getattr(self, attr, None)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{type(self).__name__}.{attr}: expected a finite number, got {v!r}")

    def unroll(self, X0: Tensor, C: Optional[Tensor] = None, steps: int = 1) -> Tensor:
        """Iterate the step: returns the trajectory [steps + 1, *X0.shape] with X0 first.

        Example:
            >>> import fastjac as fj, torch
            >>> m = fj.ItrSA(16, 2)
            >>> m.unroll(torch.randn(9, 16), steps=4).shape
            torch.Size([5, 9, 16])
        """
        _check_int("steps", steps, 0)
        xs = [X0]
        for _ in range(steps):
            xs.append(self(xs[-1], C))
        return torch.stack(xs)


def _check_dtype(dtype) -> torch.dtype:
    """A real floating-point dtype (None: torch's default); complex and integer weights are refused up front."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32, got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a real floating-point dtype (torch.float32 or torch.float64), got {dtype}")
    return dtype


def _check_device(device):
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a torch device: {device!r} ({e})") from None


class _RecurrentAttention(RecurrentStep):
    """Multi-head attention weights shared by ItrSA and AKOrN, plus the learnable step size eta."""

    def __init__(
        self,
        dim,
        heads,
        *,
        head_dim=None,
        value_dim=None,
        out_proj=True,
        bias=False,
        eta=1.0,
        beta=None,
        causal=False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        D, H = _check_int("dim", dim), _check_int("heads", heads)
        dh = _check_int("head_dim", head_dim) if head_dim is not None else max(1, D // H)
        if out_proj:
            dv = _check_int("value_dim", value_dim) if value_dim is not None else dh
        else:
            if value_dim not in (None, D):
                raise ValueError(f"value_dim: without an output projection the values are D={D} wide, got {value_dim}")
            dv = D
        fk = dict(dtype=_check_dtype(dtype), device=_check_device(device))
        eta = check_number("eta", eta)
        if beta is not None:
            beta = check_number("beta", beta)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected True or False, got {type(causal).__name__} {causal!r}")
        for flag, v in (("out_proj", out_proj), ("bias", bias)):
            if not isinstance(v, bool):
                raise TypeError(f"{flag}: expected True or False, got {type(v).__name__} {v!r}")
        self.dim, self.heads, self.head_dim, self.value_dim = D, H, dh, dv
        self.wq = nn.Parameter(torch.randn(H, D, dh, **fk) / math.sqrt(D))
        self.wk = nn.Parameter(torch.randn(H, D, dh, **fk) / math.sqrt(D))
        self.wv = nn.Parameter(torch.randn(H, D, dv, **fk) / math.sqrt(D))
        self.wo = nn.Parameter(torch.randn(H, dv, D, **fk) / math.sqrt(H * dv)) if out_proj else None
        if bias:
            u = lambda *s: nn.Parameter((torch.rand(*s, **fk) * 2 - 1) / math.sqrt(D))  # noqa: E731 (nn.Linear's init)
            self.bq, self.bk, self.bv, self.bo = u(H, dh), u(H, dh), u(H, dv), u(D)
        else:
            self.bq = self.bk = self.bv = self.bo = None
        self.eta = nn.Parameter(torch.tensor(float(eta), **fk))
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(dh)
        self.causal = bool(causal)
        # what rebuilds this model (save_model / load_model, checkpoint fingerprints); subclasses add their own
        self._config: Dict[str, Any] = dict(
            dim=D,
            heads=H,
            head_dim=dh,
            value_dim=dv if out_proj else None,
            out_proj=bool(out_proj),
            bias=bool(bias),
            beta=self.beta,
            causal=self.causal,
        )

    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this model's structure (JSON-ready; the weights are separate)."""
        return dict(self._config)

    def attn_params(self) -> AttnParams:
        return AttnParams(
            self.wq, self.wk, self.wv, self.wo, self.bq, self.bk, self.bv, self.bo, self.beta, self.causal
        )

    def msa(self, X: Tensor) -> Tensor:
        """MSA(X) alone. X: [S, D] or [B, S, D]."""
        return msa_forward(X, self.attn_params())

    def _check_forward(self, X: Tensor, C: Optional[Tensor]) -> None:
        # shape-only checks: they must stay data-independent so torch.func transforms can trace forward()
        if X.dim() not in (2, 3) or X.shape[-1] != self.dim:
            raise ValueError(f"X: expected shape [S, {self.dim}] or [B, S, {self.dim}], got {tuple(X.shape)}")
        if C is not None and C.shape != X.shape and C.shape != X.shape[-2:]:
            raise ValueError(f"C: expected shape {tuple(X.shape)} (or [S, D] for a batch), got {tuple(C.shape)}")

    def msa_linearization(self, X: Tensor) -> BatchedLinearization:
        """J_MSA = dMSA/dX alone at X [B, S, D] (analytic, torch ops): for ``part="msa"`` analyses."""
        return MSALinearization(X, self.attn_params())


class ItrSA(_RecurrentAttention):
    """Iterated self-attention (Tomihari & Karakida Eq. 9): ``X' = Norm(X + eta (C + MSA(X)))``.

    Args:
        dim: D, features per token. heads: H.
        head_dim: dh of queries/keys (default D // H). value_dim: dv (default dh; D when ``out_proj=False``).
        out_proj: use Wo [H, dv, D]; without it Wo_h = I and dv = D (the paper's propositions).
        bias: biases bq, bk, bv, bo. norm: "l2" | "rms" | "layer" | "none", applied per group of ``norm_group``
        features (default D). eps: the norm's epsilon. eta: initial value of the learnable step size.
        beta: inverse temperature (default 1/sqrt(dh)). causal: mask keys j > i.

    Attributes: wq, wk [H, D, dh]; wv [H, D, dv]; wo [H, dv, D] or None; bq, bk [H, dh], bv [H, dv], bo [D] or
    None; gamma [D] (None for "none"); norm_bias [D] ("layer") or None; eta (0-dim parameter); beta; eps; norm;
    norm_group; causal.

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.ItrSA(dim=24, heads=3, norm="rms", causal=True)
        >>> X = torch.randn(2, 7, 24)
        >>> m(X).shape, fj.jacobian(m, X).shape
        (torch.Size([2, 7, 24]), torch.Size([2, 168, 168]))
    """

    def __init__(
        self,
        dim,
        heads,
        *,
        head_dim=None,
        value_dim=None,
        out_proj=True,
        bias=False,
        norm="l2",
        norm_group=None,
        eps=1e-6,
        eta=1.0,
        beta=None,
        causal=False,
        dtype=None,
        device=None,
    ):
        super().__init__(
            dim,
            heads,
            head_dim=head_dim,
            value_dim=value_dim,
            out_proj=out_proj,
            bias=bias,
            eta=eta,
            beta=beta,
            causal=causal,
            dtype=dtype,
            device=device,
        )
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        N = _check_int("norm_group", norm_group) if norm_group is not None else dim
        if dim % N:
            raise ValueError(f"norm_group: must divide dim={dim}, got {N}")
        eps = check_number("eps", eps, minimum=0.0)
        fk = dict(dtype=self.wq.dtype, device=self.wq.device)
        self.norm, self.norm_group, self.eps = norm, N, float(eps)
        self.gamma = nn.Parameter(torch.ones(dim, **fk)) if norm != "none" else None
        self.norm_bias = nn.Parameter(torch.zeros(dim, **fk)) if norm == "layer" else None
        self._config.update(norm=norm, norm_group=N, eps=self.eps)

    def norm_params(self) -> NormParams:
        return NormParams(self.norm, self.gamma, self.norm_bias, self.eps, self.norm_group)

    def step_params(self) -> ItrSAParams:
        return ItrSAParams(self.attn_params(), self.norm_params(), self.eta)

    def forward(self, X: Tensor, C: Optional[Tensor] = None) -> Tensor:
        """One step. X: [S, D] or [B, S, D]; C: X's shape, [S, D], or None. Returns X's shape."""
        self._check_forward(X, C)
        F = self.msa(X) if C is None else C + self.msa(X)
        return norm_forward(X + self.eta * F, self.norm_params())

    def linearize_analytic(self, X: Tensor, C: Optional[Tensor] = None) -> ItrSALinearization:
        """The torch-backend linearisation at a batched X [B, S, D]."""
        return ItrSALinearization(X, C, self.step_params())

    def trivial_count(self, S: int, D: int) -> int:
        # each group's radial direction (LayerNorm: also the constant direction) is mapped to zero
        if self.norm == "none":
            return 0
        return (2 if self.norm == "layer" else 1) * S * D // self.norm_group

    def radial_basis(self, X: Tensor) -> Optional[Tensor]:
        if self.norm == "none":
            return None
        return _radial_basis(X, self.norm_group, self.gamma, self.norm_bias, self.norm)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
            f"out_proj={self.wo is not None}, bias={self.bq is not None}, norm={self.norm!r}, "
            f"norm_group={self.norm_group}, beta={self.beta:.4g}, causal={self.causal}"
        )


class AKOrN(_RecurrentAttention):
    """Artificial Kuramoto oscillatory neurons (Miyato et al. 2025) as a recurrent step:

    ``X' = Pi_osc(X + eta (Omega X + Proj_X(C + MSA(X))))``, oscillators = groups of ``osc_dim`` features.

    Omega acts on each oscillator by the anti-symmetric part of ``omega`` [G, N, N] (G = D / N), so any value of the
    parameter gives a valid rotation generator. Pi_osc is the unit-sphere projection per oscillator (eps = 0): states
    are meant to live on the product of spheres (``AKOrN.project(X)`` puts them there).
    Other arguments as for :class:`ItrSA`.

    Example:
        >>> import fastjac as fj, torch
        >>> m = fj.AKOrN(dim=16, heads=2, osc_dim=4)
        >>> X = m.project(torch.randn(5, 16))
        >>> Y, JT = fj.jvp(m, X, torch.randn(3, 5, 16))
        >>> JT.shape
        torch.Size([3, 5, 16])
    """

    def __init__(
        self,
        dim,
        heads,
        *,
        osc_dim=4,
        head_dim=None,
        value_dim=None,
        out_proj=True,
        bias=False,
        eta=1.0,
        beta=None,
        causal=False,
        omega_std=1.0,
        dtype=None,
        device=None,
    ):
        super().__init__(
            dim,
            heads,
            head_dim=head_dim,
            value_dim=value_dim,
            out_proj=out_proj,
            bias=bias,
            eta=eta,
            beta=beta,
            causal=causal,
            dtype=dtype,
            device=device,
        )
        N = _check_int("osc_dim", osc_dim)
        if dim % N:
            raise ValueError(f"osc_dim: must divide dim={dim}, got {N}")
        omega_std = check_number("omega_std", omega_std, minimum=0.0)
        self.osc_dim = N
        self._config.update(osc_dim=N)
        self.omega = nn.Parameter(omega_std * torch.randn(dim // N, N, N, dtype=self.wq.dtype, device=self.wq.device))

    @property
    def norm(self) -> str:
        return "l2"

    def project(self, X: Tensor) -> Tensor:
        """Put every oscillator of X on its unit sphere. X: [..., S, D]."""
        Xg = group(X, self.osc_dim)
        return (Xg / Xg.norm(dim=-1, keepdim=True)).flatten(-2)

    def step_params(self) -> AKOrNParams:
        return AKOrNParams(self.attn_params(), self.omega, self.osc_dim, self.eta)

    def forward(self, X: Tensor, C: Optional[Tensor] = None) -> Tensor:
        """One step. X: [S, D] or [B, S, D]; C: X's shape, [S, D], or None. Returns X's shape."""
        self._check_forward(X, C)
        Y = self.msa(X) if C is None else C + self.msa(X)
        Z = X + self.eta * (omega_apply(self.omega, X) + proj_forward(X, Y, self.osc_dim))
        return norm_forward(Z, NormParams("l2", None, None, 0.0, self.osc_dim))

    def linearize_analytic(self, X: Tensor, C: Optional[Tensor] = None) -> AKOrNLinearization:
        return AKOrNLinearization(X, C, self.step_params())

    def trivial_count(self, S: int, D: int) -> int:
        return S * D // self.osc_dim  # one radial direction per oscillator

    def radial_basis(self, X: Tensor) -> Optional[Tensor]:
        return _radial_basis(X, self.osc_dim, None, None, "l2")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, osc_dim={self.osc_dim}, head_dim={self.head_dim}, "
            f"value_dim={self.value_dim}, out_proj={self.wo is not None}, bias={self.bq is not None}, "
            f"beta={self.beta:.4g}, causal={self.causal}"
        )


def _radial_basis(X: Tensor, N: int, gamma: Optional[Tensor], bias: Optional[Tensor], kind: str) -> Tensor:
    """Per group, an orthonormal basis of the directions a normalised state cannot move in: [B, S, G, r, N].

    The step's output lies on a product of ellipsoids; the tangents J T lie in the range of the normalisation's
    Jacobian, whose orthogonal complement at Y = gamma z/|z| is spanned by Y/gamma^2 (and 1/gamma for LayerNorm).
    """
    Y = X if bias is None else X - bias
    if gamma is not None:
        if bool((gamma == 0).any()):
            raise ValueError(
                "project_radial: the norm weight gamma has zero entries; the state's tangent space is degenerate there"
            )
        vecs = [group(Y / gamma**2, N)]
        if kind == "layer":
            vecs.insert(0, group((1 / gamma).expand_as(Y), N))
    else:
        vecs = [group(Y, N)]
    basis = []
    for v in vecs:  # Gram-Schmidt per group
        for u in basis:
            v = v - (v * u).sum(-1, keepdim=True) * u
        basis.append(v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny))
    return torch.stack(basis, -2)


class MSALinearization(BatchedLinearization):
    """dMSA/dX alone at X [B, S, D] in torch ops (the attention cache of ``fastjac/ops/attention/ref.py``).

    ``probs`` [B, H, S, S] are the attention probabilities at X (the pseudo-energy's PV picture uses them).
    """

    def __init__(self, X: Tensor, p: AttnParams):
        self.X, self.attn = X, msa_cache(X, p)
        self.out, self.probs = self.attn.out, self.attn.A

    def jvp(self, T: Tensor) -> Tensor:
        return msa_jvp(self.attn, T)

    def vjp(self, G: Tensor) -> Tensor:
        return msa_vjp(self.attn, G)

    def dense(self, out: Optional[Tensor] = None) -> Tensor:
        B, S, D = self.X.shape
        if out is None:
            out = torch.empty(B, S * D, S * D, dtype=self.X.dtype, device=self.X.device)
        rows = out.view(B, S, D, S, D)
        for b in range(B):
            msa_jacobian_rows(self.attn, 0, S, batch=slice(b, b + 1), out=rows[b : b + 1])
        return out


# ---------------------------------------------------------------------------------------------------- save / load

#: classes load_model may rebuild, by name; a file can only ever name one of these (nothing is imported or run)
MODEL_CLASSES: Dict[str, type] = {"ItrSA": ItrSA, "AKOrN": AKOrN}


def register_model(cls: type) -> type:
    """Let :func:`load_model` rebuild ``cls`` (a model with ``config()``) from a file naming it. Usable as a decorator."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def save_model(model: nn.Module, path: str, *, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save a fastjac model as one safetensors file: the weights, plus its class and ``config()`` as JSON metadata.

    Loading it (:func:`load_model`) runs no code from the file. ``metadata``: extra str -> str entries to keep.

    Example:
        >>> import fastjac as fj, tempfile, os
        >>> m = fj.ItrSA(8, 2, norm="rms")
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> fj.save_model(m, path)
        >>> fj.load_model(path).norm
        'rms'
    """
    if not isinstance(model, RecurrentStep) or MODEL_CLASSES.get(type(model).__name__) is not type(model):
        raise TypeError(f"model: expected a fastjac model (one of {sorted(MODEL_CLASSES)}), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError(f"metadata: expected a dict of str -> str, got {metadata!r:.80}")
    meta = dict(metadata or {})
    meta.update(fastjac_class=type(model).__name__, fastjac_config=json.dumps(model.config()))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write_safetensors(tensors, os.fspath(path), meta)


def _write_safetensors(tensors: Dict[str, Tensor], path: str, metadata: Dict[str, str]) -> None:
    """Write a safetensors file atomically (``path + ".tmp"``, renamed over ``path``; nothing is left behind on
    failure). A folder or a missing folder as ``path`` is a ValueError; a failed write (full disk, read-only
    folder) an OSError naming ``path``."""
    import errno as _errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ._io import atomic_write

    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: the folder {folder!r} does not exist; create it or pass another path")

    def write(tmp):
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # the Rust writer's I/O errors: give them the OSError they are
            m = re.search(r"os error (\d+)", str(e))
            code = int(m.group(1)) if m else _errno.EIO
            raise OSError(code, os.strerror(code), path) from None

    atomic_write(path, write)


#: the largest model (its parameters, GB = 1e9 bytes) that load_model builds and check_model_size allows, unless
#: the environment variable FASTJAC_MODEL_LIMIT_GB or a per-call ``limit_gb=`` / ``max_gb=`` says otherwise
DEFAULT_MODEL_LIMIT_GB = 4.0


def model_limit_gb() -> float:
    """The model-size limit in GB: ``FASTJAC_MODEL_LIMIT_GB`` if set to a positive number, else 4."""
    raw = os.environ.get("FASTJAC_MODEL_LIMIT_GB")
    if raw is None or not raw.strip():
        return DEFAULT_MODEL_LIMIT_GB
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"FASTJAC_MODEL_LIMIT_GB: expected a positive number of GB, got {raw!r}")
    return v


def check_model_size(
    dim,
    heads,
    *,
    head_dim=None,
    value_dim=None,
    out_proj=True,
    bias=False,
    norm="l2",
    osc_dim=None,
    dtype=torch.float64,
    limit_gb: Optional[float] = None,
    what: str = "model",
    **ignored,
) -> int:
    """The bytes of the parameters ``ItrSA(dim, heads, ...)`` (or, with ``osc_dim``, ``AKOrN``) would allocate,
    computed from the arguments alone (nothing is allocated); ValueError naming ``dim`` when they exceed
    ``limit_gb`` (default :func:`model_limit_gb`: 4 GB or ``FASTJAC_MODEL_LIMIT_GB``). Used by :func:`load_model`
    before it builds anything, and by the CLI before it builds a model from ``--dim``/``--heads``. Other keyword
    arguments (a model config's ``beta``, ``eps``, ...) do not change the size and are ignored.

    Example:
        >>> import torch
        >>> check_model_size(64, 4, dtype=torch.float64)  # wq, wk, wv, wo [4, 64, 16], eta, gamma [64]
        131592
    """
    D, H = _check_int("dim", dim), _check_int("heads", heads)
    dh = _check_int("head_dim", head_dim) if head_dim is not None else max(1, D // H)
    dv = (_check_int("value_dim", value_dim) if value_dim is not None else dh) if out_proj else D
    n = H * D * (2 * dh + dv) + (H * dv * D if out_proj else 0) + 1  # wq, wk, wv, wo, eta
    if bias:
        n += H * (2 * dh + dv) + D
    if osc_dim is not None:
        n += D * _check_int("osc_dim", osc_dim)  # omega [D / N, N, N]
    else:
        n += D * ((norm != "none") + (norm == "layer"))  # gamma, the LayerNorm bias
    nbytes = n * torch.empty((), dtype=_check_dtype(dtype)).element_size()
    limit = check_number("limit_gb", limit_gb if limit_gb is not None else model_limit_gb(), positive=True)
    if nbytes > limit * 1e9:
        raise ValueError(
            f"dim: a {what} with dim={D}, heads={H} (head_dim={dh}, value_dim={dv}) would hold {n:,} "
            f"parameters = {nbytes / 1e9:.2f} GB in {dtype}, over the limit of {limit:g} GB "
            f"(FASTJAC_MODEL_LIMIT_GB, or limit_gb=/max_gb=); pass a smaller dim or raise the limit"
        )
    return nbytes


def _depth(v, limit: int = 8) -> int:
    if isinstance(v, (list, dict)) and limit > 0:
        items = v.values() if isinstance(v, dict) else v
        return 1 + max((_depth(x, limit - 1) for x in items), default=0)
    return 0 if not isinstance(v, (list, dict)) else 1


def _flat_config(path: str, text: str, key: str, max_depth: int = 3) -> Dict[str, Any]:
    """A model config from a file's metadata: a JSON object whose values nest at most ``max_depth`` levels (ItrSA's
    and AKOrN's are flat; a registered class may keep short lists)."""
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"path: {path!r} has a corrupt {key} ({why})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"path: {path!r} has a {key} that is not a JSON object ({type(cfg).__name__})")
    bad = [k for k, v in cfg.items() if _depth(v) > max_depth]
    if bad:
        raise ValueError(f"path: {path!r} has a {key} with values nested deeper than {max_depth} levels for {bad}")
    return cfg


def _constructor_config(path: str, cls: type, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Refuse keys the constructor does not take (and dtype/device, which the loader decides), naming them."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    bad = sorted(k for k in cfg if k in ("dtype", "device", "self") or (not takes_any and k not in params))
    if bad:
        raise ValueError(f"path: {path!r}: fastjac_config has keys {cls.__name__} does not take from a file: {bad}")
    return cfg


def _tensor_infos(path: str, f) -> Dict[str, Any]:
    """name -> (torch dtype, shape) of every tensor in an open safetensors file, without reading the data."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for k in f.keys():
        sl = f.get_slice(k)
        dt = names.get(sl.get_dtype())
        if dt is None:
            raise ValueError(
                f"path: {path!r}: tensor {k!r} has dtype {sl.get_dtype()}; a fastjac model holds "
                f"floating-point tensors only"
            )
        out[k] = (dt, tuple(sl.get_shape()))
    return out


def _check_tensors(path: str, model: nn.Module, infos: Dict[str, Any]) -> None:
    """The file's tensors (name -> (dtype, shape)) are exactly the model's state_dict with the same shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(infos)), sorted(set(infos) - set(want))
    if missing or unexpected:
        raise ValueError(f"path: {path!r} does not match its config: missing {missing}, unexpected {unexpected}")
    wrong = [f"{k} {list(infos[k][1])} (config: {list(want[k])})" for k in want if infos[k][1] != want[k]]
    if wrong:
        raise ValueError(f"path: {path!r}: tensor shapes do not match its config: {', '.join(wrong)}")


def _file_dtype(path: str, infos: Dict[str, Any]) -> Optional[torch.dtype]:
    """The one floating dtype of a file's tensors (None for no tensors); mixed dtypes are refused."""
    dtypes = sorted({str(dt) for dt, _ in infos.values()})
    if len(dtypes) > 1:
        raise ValueError(
            f"path: {path!r} mixes tensor dtypes {dtypes}; a model has one dtype (save it with "
            f"fastjac.save_model after model.to(dtype))"
        )
    return getattr(torch, dtypes[0].split(".")[-1]) if dtypes else None


def load_model(
    path: str, *, map_location="cpu", allow_pickle: bool = False, max_gb: Optional[float] = None
) -> nn.Module:
    """Load a model written by :func:`save_model` (safetensors + JSON config: no code in the file runs).

    A file written by ``torch.save(model, path)`` is a pickle, and unpickling runs whatever code the file holds:
    it is loaded only with ``allow_pickle=True`` (and a warning), for files you made yourself.

    Before anything is allocated, the config (a flat JSON object of the constructor's arguments), the size of the
    model it describes (:func:`check_model_size`, ``max_gb`` or ``FASTJAC_MODEL_LIMIT_GB``, default 4 GB), the
    tensors' names, shapes and (single) dtype are checked against each other.

    Raises ValueError for a missing, unreadable, foreign or inconsistent file, naming the path and what was wrong.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    device = _check_device(map_location)
    if device is not None and device.type == "meta":
        raise ValueError("map_location: 'meta' tensors hold no data; load to 'cpu' or 'cuda'")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location: {map_location!r} but no CUDA device is present; load to 'cpu'")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            infos = _tensor_infos(path, f)
    except (SafetensorError, OSError) as e:
        if not allow_pickle:
            raise ValueError(
                f"path: {path!r} is not a safetensors model file ({e}). Save models with "
                f"fastjac.save_model(model, path); a torch.save pickle is loaded only with "
                f"allow_pickle=True (CLI: --allow-pickle), because unpickling runs code from the file"
            ) from None
        warnings.warn(
            f"load_model: unpickling {path!r} (allow_pickle=True): this runs any code the file holds; "
            f"load only files you made",
            UserWarning,
            stacklevel=2,
        )
        model = torch.load(path, map_location=map_location, weights_only=False)
        if type(model).__name__ not in MODEL_CLASSES or not isinstance(model, nn.Module):
            raise ValueError(
                f"path: {path!r} holds a {type(model).__name__}, not a fastjac model ({sorted(MODEL_CLASSES)})"
            ) from None
        return model
    cls = MODEL_CLASSES.get(meta.get("fastjac_class", ""))
    if cls is None or "fastjac_config" not in meta:
        raise ValueError(
            f"path: {path!r} is a safetensors file but not a fastjac model (metadata fastjac_class="
            f"{meta.get('fastjac_class')!r}; expected one of {sorted(MODEL_CLASSES)})"
        )
    cfg = _constructor_config(path, cls, _flat_config(path, meta["fastjac_config"], "fastjac_config"))
    dtype = _file_dtype(path, infos)
    try:
        if issubclass(cls, _RecurrentAttention) and "dim" in cfg and "heads" in cfg:
            kw = dict(cfg)
            if issubclass(cls, AKOrN):
                kw.setdefault("osc_dim", 4)
            else:
                kw.pop("osc_dim", None)
            check_model_size(**kw, dtype=dtype or torch.float32, limit_gb=max_gb, what=cls.__name__)
        model = cls(**cfg, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"path: {path!r} has a config {cls.__name__} refuses: {e}") from None
    _check_tensors(path, model, infos)
    with safe_open(path, framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(tensors, strict=True)
    return model.to(device) if device is not None else model
