"""Lyapunov exponents of a recurrent step (DESIGN section 3): Benettin/QR over long trajectories, and the paper's
finite-horizon exponents.

    res = fj.lyapunov_spectrum(model, X0, C=C, k=32, steps=1000, burn_in=100)
    res.exponents, res.max, res.mean, res.history        # descending float64; running estimates for plots

Trivial exponents. A normalisation maps each group's radial direction (and, for LayerNorm, the constant direction
too) to zero, so ``S*D/N`` (LayerNorm: ``2*S*D/N``) exponents of a normalised step are -inf (with ``eps > 0`` the
radial direction survives with a factor of about eps/|z|^2 per step: not dynamics either). They are reported as
-inf with a ``trivial`` mask and never enter ``mean``. ``project_radial=True`` instead keeps the tangents on the
tangent space of the normalised states, so the k tangents explore only non-trivial directions.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import config
from .._checks import NonFiniteError, check_dense_size, json_safe
from .._checks import check_int as _check_int
from .._compat import make_generator, renamed_kwargs
from ..linearization import linearization, prepare
from ..models import RecurrentStep
from ..ops.qr import QR_BACKENDS, qr
from ..ops.qr import qr_backend as _qr_backend_for

# Largest S*D for which k=None means "all S*D tangents"; above it a k must be given.
FULL_K_LIMIT = 4096


@dataclass
class LyapunovResult:
    """Lyapunov exponents of one trajectory per sample.

    Attributes:
        exponents: [k] (or [B, k] for a batched X0), float64, descending; -inf where ``trivial``.
        trivial: bool, exponents' shape: directions killed by normalisation (or below ``trivial_below``).
        history: [R, k] (or [R, B, k]) running estimates at the steps in ``history_steps`` [R] (columns in the
            order of ``exponents``); empty for finite-horizon results.
        steps: number of Jacobians in the product (after burn-in). settings: how it was computed.
    """

    exponents: Tensor
    trivial: Tensor
    history: Tensor
    history_steps: Tensor
    steps: int
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        return self.exponents.dim() == 2

    def _reduce(self, fn) -> Tensor:
        ex = self.exponents if self.batched else self.exponents.unsqueeze(0)
        tv = self.trivial if self.batched else self.trivial.unsqueeze(0)
        vals = torch.stack([fn(e[~t]) if bool((~t).any()) else e.new_tensor(float("nan")) for e, t in zip(ex, tv)])
        return vals if self.batched else vals[0]

    @property
    def max(self) -> Tensor:
        """The largest non-trivial exponent: a float64 tensor, 0-dim (or [B] for a batched X0)."""
        return self._reduce(lambda e: e.max())

    @property
    def mean(self) -> Tensor:
        """The mean of the non-trivial exponents (0-dim, or [B]); trivial -inf never enters it."""
        return self._reduce(lambda e: e.mean())

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: -inf exponents are written as null (JSON has no infinity) with the ``trivial`` mask."""
        def clean(t: Tensor):
            return [None if not math.isfinite(v) else v for v in t.tolist()] if t.dim() == 1 else \
                [clean(r) for r in t]
        m, mu = self.max, self.mean
        return json_safe({
            "exponents": clean(self.exponents), "trivial": self.trivial.tolist(),
            "max": _json_num(m), "mean": _json_num(mu), "units": "nats per step",
            "steps": self.steps, "settings": self.settings,
            "history_steps": self.history_steps.tolist(), "history": clean(self.history.flatten(1)) if
            self.history.numel() else [],
        })

    def save_json(self, path: str) -> None:
        """Write :meth:`to_dict` as strict JSON (no bare NaN/Infinity: non-finite numbers are null)."""
        with open(path, "w") as f:
            json.dump(json_safe(self.to_dict()), f, indent=1, allow_nan=False)

    def __repr__(self) -> str:
        return (f"LyapunovResult(method={self.settings.get('method')!r}, steps={self.steps}, "
                f"k={self.exponents.shape[-1]}, max={self.max}, mean={self.mean}, "
                f"trivial={int(self.trivial.sum())})")


# ---------------------------------------------------------------------------------------------------- helpers

def _json_num(t: Tensor):
    """A tensor's value(s) for strict JSON: NaN and +-inf become null."""
    v = t.tolist()
    fix = lambda x: x if isinstance(x, float) and math.isfinite(x) else (None if isinstance(x, float) else x)  # noqa
    return [fix(x) for x in v] if isinstance(v, list) else fix(v)


def trivial_count(step, S: int, D: int) -> int:
    """How many exponents of the full S*D spectrum normalisation makes -inf (0 for a callable: unknown)."""
    return step.trivial_count(S, D) if isinstance(step, RecurrentStep) else 0


def radial_basis(step, X: Tensor) -> Optional[Tensor]:
    """Per group, an orthonormal basis of the directions a normalised state cannot move in: [B, S, G, r, N]
    (``RecurrentStep.radial_basis``); None when the step has no normalisation (or is a plain callable)."""
    return step.radial_basis(X) if isinstance(step, RecurrentStep) else None


def project_off(T: Tensor, basis: Optional[Tensor]) -> Tensor:
    """Remove from tangents T [k, B, S, D] their components along ``basis`` [B, S, G, r, N]."""
    if basis is None:
        return T
    G, N = basis.shape[-3], basis.shape[-1]
    Tg = T.unflatten(-1, (G, N))
    coef = torch.einsum("kbsgn,bsgrn->kbsgr", Tg, basis)
    return (Tg - torch.einsum("kbsgr,bsgrn->kbsgn", coef, basis)).flatten(-2)


def _trivial_mask(ex: Tensor, n: int, n_triv: int, dtype: torch.dtype, below: Optional[float]) -> Tensor:
    """ex [B, k] sorted descending: the structural tail (k > n - n_triv) plus anything below ``below``."""
    k = ex.shape[-1]
    mask = torch.zeros_like(ex, dtype=torch.bool)
    extra = k - (n - n_triv)
    if extra > 0:
        mask[..., k - extra:] = True
    if below is None:  # 1000 ulps per step: indistinguishable from rounding noise in this dtype
        below = math.log(1e3 * torch.finfo(dtype).eps)
    return mask | (ex < below)


_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 4  # how deep the fingerprint follows closures, referenced globals and attributes


def _hash_tensor(h, t: Tensor) -> None:
    t = t.detach()
    h.update(f"<tensor {tuple(t.shape)} {t.dtype}>".encode())
    if t.device.type == "meta":
        return
    t = t.cpu().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    h.update(t.view(torch.uint8).numpy().tobytes())


def _hash_code(h, code: types.CodeType) -> None:
    h.update(f"<code {code.co_qualname if hasattr(code, 'co_qualname') else code.co_name}>".encode())
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _hash_code(h, c)
        else:
            h.update(repr((type(c).__name__, c)).encode())


def _hash_function(h, f: types.FunctionType, depth: int, seen: set) -> None:
    h.update(f"<function {f.__module__}.{f.__qualname__}>".encode())
    _hash_code(h, f.__code__)
    _hash_obj(h, f.__defaults__, depth + 1, seen)
    _hash_obj(h, f.__kwdefaults__, depth + 1, seen)
    for cell in f.__closure__ or ():
        try:
            val = cell.cell_contents
        except ValueError:  # an empty cell
            val = None
        _hash_obj(h, val, depth + 1, seen)
    g = f.__globals__
    for name in f.__code__.co_names:  # referenced globals: numbers, tensors, functions, modules
        if name in g and not isinstance(g[name], (types.ModuleType, type)):
            h.update(f"<global {name}>".encode())
            _hash_obj(h, g[name], depth + 1, seen)


def _hash_module(h, m: torch.nn.Module, depth: int, seen: set) -> None:
    cls = type(m)
    h.update(f"<module {cls.__module__}.{cls.__qualname__}>".encode())
    if isinstance(m, RecurrentStep):
        h.update(json.dumps(m.config(), sort_keys=True, default=repr).encode())
    for name, sub in m.named_modules():  # every submodule's class and plain attributes (beta, eps, norm, ...)
        h.update(f"<sub {name} {type(sub).__module__}.{type(sub).__qualname__}>".encode())
        for key in sorted(vars(sub)):
            val = vars(sub)[key]
            if not key.startswith("_") and isinstance(val, _SCALARS + (tuple, list, dict, Tensor)):
                h.update(f"<attr {key}>".encode())
                _hash_obj(h, val, depth + 1, seen)
        fwd = getattr(type(sub), "forward", None)
        if isinstance(fwd, types.FunctionType):
            _hash_code(h, fwd.__code__)
    for name, t in sorted(m.state_dict(keep_vars=True).items()):  # names, shapes, dtypes, values
        h.update(f"<param {name}>".encode())
        _hash_tensor(h, t)


def _hash_obj(h, obj, depth: int = 0, seen: Optional[set] = None) -> None:
    """Feed what identifies ``obj`` into the hash h (see :func:`fingerprint` for what can and cannot be seen)."""
    seen = set() if seen is None else seen
    if isinstance(obj, _SCALARS):
        h.update(repr((type(obj).__name__, obj)).encode())  # repr of a float round-trips exactly
        return
    if isinstance(obj, Tensor):
        _hash_tensor(h, obj)
        return
    if isinstance(obj, (torch.dtype, torch.device)):
        h.update(repr(obj).encode())
        return
    if depth > _MAX_DEPTH or id(obj) in seen:
        h.update(f"<{type(obj).__qualname__} ...>".encode())
        return
    seen.add(id(obj))
    if isinstance(obj, (tuple, list)):
        h.update(f"<{type(obj).__name__} {len(obj)}>".encode())
        for v in obj:
            _hash_obj(h, v, depth + 1, seen)
    elif isinstance(obj, dict):
        h.update(f"<dict {len(obj)}>".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _hash_obj(h, obj[key], depth + 1, seen)
    elif isinstance(obj, torch.nn.Module):
        _hash_module(h, obj, depth, seen)
    elif isinstance(obj, functools.partial):
        h.update(b"<partial>")
        _hash_obj(h, (obj.func, obj.args, obj.keywords), depth + 1, seen)
    elif isinstance(obj, types.MethodType):
        h.update(b"<method>")
        _hash_obj(h, obj.__func__, depth + 1, seen)
        _hash_obj(h, obj.__self__, depth + 1, seen)
    elif isinstance(obj, types.FunctionType):
        _hash_function(h, obj, depth, seen)
    elif isinstance(obj, (types.BuiltinFunctionType, types.ModuleType, type)) or not hasattr(obj, "__dict__"):
        h.update(f"<{type(obj).__qualname__} {getattr(obj, '__module__', '')}."
                 f"{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}>".encode())
    else:  # an instance of a Python class (e.g. a callable object): its class, __call__ and attributes
        cls = type(obj)
        h.update(f"<object {cls.__module__}.{cls.__qualname__}>".encode())
        call = getattr(cls, "__call__", None)
        if isinstance(call, types.FunctionType):
            _hash_function(h, call, depth + 1, seen)
        for key in sorted(vars(obj)):
            h.update(f"<attr {key}>".encode())
            _hash_obj(h, vars(obj)[key], depth + 1, seen)


def fingerprint(step, X0: Tensor, C: Optional[Tensor], settings: Dict[str, Any]) -> str:
    """A SHA-256 of everything that defines a run, so a checkpoint is resumed only by the run that wrote it.

    It covers the settings (JSON), X0 and C (shape, dtype and values) and the step:

    - a model (any ``torch.nn.Module``, fastjac's included): its class, ``config()`` (fastjac models), the plain
      attributes of every submodule (``heads``, ``beta``, ``eps``, ``norm``, ``norm_group``, ``causal``, ... even
      when changed after construction), each submodule's ``forward`` code, and every parameter and buffer's name,
      shape, dtype and values;
    - a plain callable: its qualified name, its code object (bytecode, constants, names, nested code), its default
      arguments, the values in its closure cells and the globals it names (tensors, numbers, strings, containers
      of them, and functions and modules followed the same way, up to 4 levels deep); ``functools.partial``
      objects by their function, args and keywords; bound methods by their function and object; callable objects
      by their class, ``__call__`` and attributes.

    What it cannot see: builtin and C functions (by name only, e.g. ``torch.tanh``); objects that are neither of
    the above (by type only); state deeper than 4 levels; code of functions imported from a module and called by
    attribute (``mylib.f`` is seen as "a module"); files, environment variables or random numbers a step reads
    when it runs. Two callables that differ only there get the same fingerprint: start such a run with a fresh
    checkpoint path.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(b"<X0>")
    _hash_tensor(h, X0)
    h.update(b"<C>")
    _hash_obj(h, C)
    h.update(b"<step>")
    _hash_obj(h, step)
    return h.hexdigest()


# what a checkpoint file says it is; loaded with torch.load(weights_only=True): tensors, numbers, strings, lists
_CKPT_FORMAT = "fastjac.lyapunov_spectrum.v2"
_STATE_KEYS = ("t", "X", "Q", "sums", "hist", "hist_steps", "renorms", "m", "since", "snap", "lscale")


def _start_over(path: str) -> str:
    return f"delete {path!r} to start over (CLI: --fresh), or pass another checkpoint path"


def _load_checkpoint(path: str, device) -> Dict[str, Any]:
    """Read a checkpoint safely (no code in the file runs) or raise ValueError saying what is wrong."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint: {path!r} is empty (a write was cut off?); {_start_over(path)}")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated / corrupt / a pickle with objects weights_only refuses
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"checkpoint: {path!r} is not a readable fastjac checkpoint (corrupt, truncated, or not "
                         f"written by lyapunov_spectrum: {type(e).__name__}: {why}); nothing in it was run. "
                         f"{_start_over(path)}") from None
    ok = isinstance(saved, dict) and saved.get("format") == _CKPT_FORMAT and isinstance(saved.get("state"), dict) \
        and all(k in saved["state"] for k in _STATE_KEYS) and isinstance(saved.get("rng"), list)
    if not ok:
        raise ValueError(f"checkpoint: {path!r} is not a lyapunov_spectrum checkpoint of this fastjac version; "
                         f"{_start_over(path)}")
    return saved


def _check_writable(path: str) -> None:
    """Fail before any compute when the checkpoint cannot be written (missing folder, read-only, a directory)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"checkpoint: {path!r} is a directory; pass a file path")
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint: the folder {folder!r} does not exist; create it or pass another path")
    probe = path + ".tmp"
    try:
        with open(probe, "ab"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"checkpoint: cannot write {probe!r} ({e.strerror or e}); pass a writable path") from None


def _save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupt during the write leaves the previous checkpoint intact


def _orthonormalize(V: Tensor, qr_backend: str):
    """QR of the tangents V [k, B, S, D] as B tall-skinny [S*D, k] matrices; returns (Q [k, B, S, D], logd [B, k])."""
    k, B = V.shape[:2]
    n = V[0, 0].numel()
    Q = torch.empty_like(V)
    out = Q.view(k, B, n).permute(1, 2, 0)
    _, logd = qr(V.reshape(k, B, n).permute(1, 2, 0), backend=qr_backend, out=out)
    return Q, logd


def _prepare(step, X0: Tensor, C: Optional[Tensor]):
    return prepare(step, X0, C, name="X0")


def _lin(step, X: Tensor, C: Optional[Tensor], backend: str):
    # the trajectory's states come from the step itself: validated once at the start, not every step
    return linearization(step, X, C=C, backend=backend, check=False)


def _advance(step, X: Tensor, C: Optional[Tensor], backend: str) -> Tensor:
    with torch.no_grad():
        return _lin(step, X, C, backend).out


def _base_seed(seed) -> int:
    """The int seed of the tangents (sample b uses seed + b); a torch.Generator gives one draw from it."""
    g = make_generator(seed)  # validates: an int >= 0 or a torch.Generator
    if seed is None:
        raise TypeError("seed: expected an int or a torch.Generator, got NoneType")
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2 ** 62, (), generator=g))
    return seed


def _check_opt_float(name: str, v) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number or None, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def _independence(V: Tensor, logd: Tensor, n_track: int) -> float:
    """log of the smallest |R_ii| / |v_i| over the first n_track columns of V [k, B, S, D] (logd [B, k] from its QR):
    how much of each column is independent of the ones before it, the worst over the batch. -inf when a column
    left the range where V's dtype keeps full precision (entries near underflow or overflow)."""
    k, B = V.shape[:2]
    n = V[0, 0].numel()
    fi = torch.finfo(V.dtype)
    norms = V.reshape(k, B, -1).double().norm(dim=-1).transpose(0, 1)  # [B, k], in float64's range
    lo = math.log(fi.tiny / fi.eps) + 0.5 * math.log(n)  # entries ~ |v| / sqrt(n) must stay far from subnormal
    hi = math.log(fi.max * fi.eps) - 0.5 * math.log(n)
    ln = norms.log()
    if not bool(((ln > lo) & (ln < hi)).all()):
        return float("-inf")
    ratio = logd - ln
    return float(ratio[:, :n_track].min()) if n_track > 0 else 0.0


def _finite(V: Tensor) -> bool:
    return bool(torch.isfinite(V).all())


def _fmt_ratio(logr: float) -> str:
    if math.isnan(logr):
        return "lost (the tangents overflowed)"
    if logr == float("-inf"):
        return "lost (the tangents left the dtype's full-precision range, or a column became dependent)"
    return f"{math.exp(logr):.1e} of its norm"


def _hint(step) -> str:
    if getattr(step, "norm", None) == "none":
        return "norm='none': nothing bounds the state"
    return "nothing in the step bounds the state" if not isinstance(step, RecurrentStep) else "the step diverges"


def _check_trajectory(Xn: Tensor, Xp: Tensor, t: int, total: int, step) -> None:
    if not bool(torch.isfinite(Xn).all()):
        raise NonFiniteError(f"X0: the trajectory overflowed at step {t} of {total} (the state became inf/NaN; its "
                             f"largest entry was {Xp.abs().max().item():.3g} one step before; {_hint(step)}). "
                             f"Use fewer steps, a smaller eta or a normalised model"
                             + (" or float64" if Xn.dtype != torch.float64 else ""))


def _warn_divergence(X0: Tensor, Xt: Tensor, step) -> None:
    """A RuntimeWarning when the state grew by more than 1e6 over the run (an unbounded, diverging trajectory)."""
    a, b = X0.abs().max().item(), Xt.abs().max().item()
    if math.isfinite(b) and b > 1e6 * max(a, 1.0):
        warnings.warn(f"lyapunov_spectrum: the state grew from max|X0| = {a:.3g} to {b:.3g} ({_hint(step)}): the "
                      f"trajectory diverges, and the exponents measure that growth, not the dynamics on an "
                      f"attractor", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------- Benettin

def validate_run(step, X0: Tensor, C: Optional[Tensor], *, k, steps, burn_in, renorm_every, history_every,
                 checkpoint_every, project_radial, seed, trivial_below, qr_backend, checkpoint) -> Dict[str, Any]:
    """Every argument check of a Benettin run, once, before any compute (shared with fastjac.distributed).

    Returns the validated values: X [B, S, D], C3, batched, k, steps, burn_in, renorm_every, history_every,
    checkpoint_every, seed, trivial_below, checkpoint and n_triv (the structural -inf count).
    """
    X, C3, batched = _prepare(step, X0, C)
    B, S, D = X.shape
    n = S * D
    steps = _check_int("steps", steps, 1)
    burn_in = _check_int("burn_in", burn_in, 0)
    renorm_every = _check_int("renorm_every", renorm_every, 1)
    history_every = _check_int("history_every", history_every, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    seed = _base_seed(seed)
    trivial_below = _check_opt_float("trivial_below", trivial_below)
    if qr_backend not in QR_BACKENDS:
        raise ValueError(f"qr_backend: expected one of {QR_BACKENDS}, got {qr_backend!r}")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint: expected a file path or None, got {type(checkpoint).__name__}")
        checkpoint = os.fspath(checkpoint)
    n_triv = trivial_count(step, S, D)
    if project_radial:
        if radial_basis(step, X) is None:
            raise ValueError("project_radial: needs a fastjac model with a normalisation (ItrSA with norm != 'none', "
                             "or AKOrN)")
        if burn_in < 1:
            raise ValueError("burn_in: project_radial needs burn_in >= 1 so that the states lie on the normalised "
                             "manifold whose tangent space the tangents are kept in")
    n_eff = n - n_triv if project_radial else n
    if k is None:
        if n > FULL_K_LIMIT:
            raise ValueError(f"k: S*D = {n} is over {FULL_K_LIMIT}, where all tangents at once are too costly; pass "
                             f"k (the number of leading exponents wanted, e.g. k=32)")
        k = n_eff
    k = _check_int("k", k, 1)
    if k > n_eff:
        raise ValueError(f"k: expected at most {n_eff} tangents ({'S*D minus the trivial directions' if project_radial else 'S*D'}), got {k}")
    try:  # an unusable QR backend is refused now, not after the burn-in
        _qr_backend_for(torch.empty(0, n, k, dtype=X.dtype, device=X.device), qr_backend)
    except (ValueError, TypeError) as e:
        raise type(e)(f"qr_backend: {str(e).split(': ', 1)[-1]}") from None
    return dict(X=X, C3=C3, batched=batched, k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
                history_every=history_every, checkpoint_every=checkpoint_every, seed=seed,
                trivial_below=trivial_below, checkpoint=checkpoint, n_triv=n_triv)


def lyapunov_spectrum(step, X0: Tensor, *, C: Optional[Tensor] = None, k: Optional[int] = None, steps: int,
                      burn_in: int = 0, renorm_every: int = 1, project_radial: bool = False, backend: str = "auto",
                      qr_backend: str = "auto", seed: int = 0, history_every: int = 1,
                      checkpoint: Optional[str] = None, checkpoint_every: int = 100, progress: bool = True,
                      trivial_below: Optional[float] = None, parallel: Optional[str] = None,
                      group=None) -> LyapunovResult:
    """The k largest Lyapunov exponents along the trajectory from X0 by the Benettin/QR method.

    ``Q <- qr(J_t Q)`` every ``renorm_every`` steps, ``lambda_i = (1/steps) sum log|R_ii|`` accumulated in float64,
    after ``burn_in`` steps of the state alone. One linearisation per step answers all k tangents (on the analytic
    backends the k tangents share one softmax).

    Args:
        step: a fastjac model or any callable X -> X (called as step(X) or step(X, C)).
        X0: [S, D], or [B, S, D] for B independent trajectories (per-sample results). C: injected input or None.
        k: number of tangents; None means all S*D (S*D <= 4096), or S*D minus the trivial ones when
            ``project_radial``.
        steps: Jacobians in the product (after burn-in). burn_in: state-only steps first.
        renorm_every: re-orthonormalise every m steps. In between, each tangent is only rescaled to norm 1 (so
            none overflows or underflows), but all of them turn toward the leading directions: after m steps column
            i keeps a part ``|R_ii| / |v_i| ~ exp(-m (lambda_1 - lambda_i))`` independent of the columns before it.
            The rule: at every re-orthonormalisation that part must be at least sqrt(eps) of the dtype (3.5e-4 in
            float32, 1.5e-8 in float64) for every column that is not a structural -inf direction; otherwise the
            interval is redone from its start with m halved (from then on), and a RuntimeWarning says so.
            ``result.settings["renorm_every_used"]`` is the interval that was finally used. So the result never
            rests on rounding noise; a too-large m only costs the redone steps.
        project_radial: keep tangents off the directions normalisation kills (fastjac models; needs burn_in >= 1,
            so that states lie where the step puts them).
        backend: Jacobian backend ("auto", "torch", "triton", "autograd"). qr_backend: see ``fastjac.ops.qr``.
        seed: seeds the random initial tangents (sample b of a batch uses seed + b). history_every: record the running estimate every this many
            re-orthonormalisations.
        checkpoint: a file path; the run saves its state there every ``checkpoint_every`` steps and on Ctrl-C, and
            a run started with the same path, inputs and settings resumes from it and ends with exactly the numbers
            of an uninterrupted run (on the same device). The file is left in place at the end. A checkpoint of
            another run (other model class, configuration, weights, X0, C or arguments: see :func:`fingerprint`)
            is refused, and so is a corrupt one (ValueError saying how to start over); it is read with
            ``torch.load(weights_only=True)``, so no code in the file runs. An unwritable path is refused before
            any compute; a write that fails later only warns (the computed exponents are returned).
        progress: show a tqdm progress bar. trivial_below: exponents below this are marked trivial
            (default log(1000 eps) of the dtype: rounding noise), besides the structural -inf of normalisation.
        parallel: None (one process), "samples" (shard a batch of samples across the ranks of ``group``) or
            "tokens" (shard the tokens of each sample); see :mod:`fastjac.distributed`. group: a
            ``torch.distributed`` process group (default: the default group). Every rank returns the same result.

    Returns:
        LyapunovResult with exponents [k] (or [B, k]) descending, trivial mask, max, mean, history.

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(16, 2, dtype=torch.float64)
        >>> X0 = torch.randn(9, 16, dtype=torch.float64)
        >>> res = fj.lyapunov_spectrum(m, X0, k=4, steps=50, burn_in=5, progress=False)
        >>> res.exponents.shape, res.history.shape
        (torch.Size([4]), torch.Size([50, 4]))
    """
    if parallel is not None:
        from ..distributed import lyapunov_spectrum_parallel  # torch.distributed is imported only when asked

        return lyapunov_spectrum_parallel(
            step, X0, C=C, k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
            project_radial=project_radial, backend=backend, qr_backend=qr_backend, seed=seed,
            history_every=history_every, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            progress=progress, trivial_below=trivial_below, parallel=parallel, group=group)
    v = validate_run(step, X0, C, k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
                     history_every=history_every, checkpoint_every=checkpoint_every, project_radial=project_radial,
                     seed=seed, trivial_below=trivial_below, qr_backend=qr_backend, checkpoint=checkpoint)
    X, C3, batched, n_triv = v["X"], v["C3"], v["batched"], v["n_triv"]
    k, steps, burn_in, renorm_every = v["k"], v["steps"], v["burn_in"], v["renorm_every"]
    history_every, checkpoint_every, seed = v["history_every"], v["checkpoint_every"], v["seed"]
    trivial_below, checkpoint = v["trivial_below"], v["checkpoint"]
    B, S, D = X.shape
    n = S * D
    settings = dict(method="benettin", k=k, steps=steps, burn_in=burn_in, renorm_every=renorm_every,
                    project_radial=project_radial, backend=backend, qr_backend=qr_backend, seed=seed,
                    history_every=history_every, dtype=str(X.dtype), shape=list(X0.shape),
                    step=type(step).__name__, device=str(X.device))
    fp = fingerprint(step, X0, C, settings) if checkpoint else None
    # a column whose part independent of the columns before it is below this fraction of its norm is rounding noise
    renorm_tol = math.sqrt(torch.finfo(X.dtype).eps)
    n_track = k if project_radial else min(k, n - n_triv)  # columns that measure real (not structural -inf) growth

    # sample b draws its initial tangents with seed + b: a batched run equals B single runs
    gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]
    st = dict(t=0, X=X, Q=None, sums=torch.zeros(B, k, dtype=torch.float64, device=X.device), hist=[],
              hist_steps=[], renorms=0, m=renorm_every, since=0, snap=None, shrunk=[],
              lscale=torch.zeros(B, k, dtype=torch.float64, device=X.device))
    if checkpoint and os.path.exists(checkpoint):
        saved = _load_checkpoint(checkpoint, X.device)
        if saved.get("fingerprint") != fp:
            raise ValueError(f"checkpoint: {checkpoint!r} was written by a run with other inputs or settings (model, "
                             f"its configuration or weights, X0, C or arguments differ); {_start_over(checkpoint)}")
        st = saved["state"]
        for g, r in zip(gens, saved["rng"]):
            g.set_state(r)
    elif checkpoint:
        _check_writable(checkpoint)
    save_failed = []

    def save(final: bool = False):
        if not checkpoint or (save_failed and not final):
            return
        try:
            _save_checkpoint(checkpoint, dict(format=_CKPT_FORMAT, fingerprint=fp, state=st,
                                              rng=[g.get_state() for g in gens]))
        except Exception as e:  # a full disk must not cost the computed exponents
            save_failed.append(e)
            warnings.warn(f"lyapunov_spectrum: could not write the checkpoint {checkpoint!r} ({e}); the run goes "
                          f"on without it", RuntimeWarning, stacklevel=3)

    from tqdm.auto import tqdm

    total = burn_in + steps
    check_states = config.check_finite
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # torch.func (the autograd backend) ignores an outer no_grad, as it should
    bar = tqdm(total=total, initial=st["t"], disable=not progress, desc="lyapunov", unit="step")
    try:
        while st["t"] < total:
            t = st["t"]
            if t < burn_in:
                Xn = _advance(step, st["X"], C3, backend)
                if check_states:
                    _check_trajectory(Xn, st["X"], t + 1, total, step)
                st["X"] = Xn
            else:
                if st["Q"] is None:  # random orthonormal tangents at the first state after burn-in
                    Q0 = torch.stack([torch.randn(k, S, D, generator=g, dtype=torch.float64) for g in gens], 1)
                    Q0 = Q0.to(X.dtype).to(X.device)
                    if project_radial:
                        Q0 = project_off(Q0, radial_basis(step, st["X"]))
                    st["Q"] = _orthonormalize(Q0, qr_backend)[0]
                if st["since"] == 0:  # start of a re-orthonormalisation interval: what a redo goes back to
                    st["snap"] = (t, st["X"], st["Q"])
                lin = _lin(step, st["X"], C3, backend)
                V = lin.jvp(st["Q"])
                if check_states:
                    _check_trajectory(lin.out, st["X"], t + 1, total, step)
                st["X"] = lin.out
                if project_radial:
                    V = project_off(V, radial_basis(step, st["X"]))
                st["since"] += 1
                done = t + 1 - burn_in
                if st["since"] == st["m"] or done == steps:
                    fin = _finite(V) or not check_states  # check_finite=False: NaN runs through, unchecked
                    if fin:
                        Qn, logd = _orthonormalize(V, qr_backend)
                    worst = _independence(V, logd, n_track) if fin and st["since"] > 1 else 0.0
                    if st["since"] > 1 and not (fin and worst >= math.log(renorm_tol)):
                        # the tangents collapsed (or overflowed) within the interval: redo it, re-orthonormalising
                        # twice as often (from here on), so no exponent is computed from rounding noise
                        t0, Xs, Qs = st["snap"]
                        st["shrunk"].append((done, st["since"], worst if fin else float("nan")))
                        if progress:
                            bar.write(f"lyapunov: re-orthonormalising every {max(1, st['since'] // 2)} steps instead of "
                                      f"{st['since']} (the tangents collapsed); redoing steps {t0 + 1}-{t + 1}")
                        st.update(t=t0, X=Xs, Q=Qs, since=0, m=max(1, st["since"] // 2), lscale=st["lscale"] * 0)
                        bar.n = t0
                        bar.refresh()
                        continue
                    if not fin:
                        raise NonFiniteError(f"X0: the tangents overflowed (inf/NaN) at step {t + 1} of {total}; "
                                             f"the step is not differentiable there or grows too fast for "
                                             f"{X.dtype}")
                    st["Q"] = Qn
                    st["sums"] = st["sums"] + logd + st["lscale"]
                    st["lscale"] = st["lscale"] * 0
                    st["renorms"] += 1
                    st["since"] = 0
                    if st["renorms"] % history_every == 0 or done == steps:
                        st["hist"].append(st["sums"] / done)
                        st["hist_steps"].append(done)
                else:
                    # between re-orthonormalisations each column is rescaled to norm 1 (its log norm kept in
                    # float64): directions are unchanged, and no tangent can overflow or underflow
                    nrm = V.reshape(k, B, -1).norm(dim=-1)  # [k, B]
                    st["lscale"] = st["lscale"] + nrm.double().log().transpose(0, 1)
                    st["Q"] = V / nrm.clamp_min(torch.finfo(V.dtype).tiny)[:, :, None, None]
            st["t"] = t + 1
            bar.update(1)
            if progress and st["hist"] and st["t"] % 10 == 0:
                bar.set_postfix(lambda_max=f"{st['hist'][-1].max().item():.4f}")
            if checkpoint and st["t"] % checkpoint_every == 0 and st["t"] < total:
                save()
    except KeyboardInterrupt:
        save(final=True)
        raise
    finally:
        bar.close()
        torch.set_grad_enabled(grad_mode)

    ex = st["sums"] / steps
    order = torch.argsort(ex, dim=-1, descending=True)
    ex = ex.gather(-1, order)
    hist = torch.stack(st["hist"]).gather(-1, order.unsqueeze(0).expand(len(st["hist"]), -1, -1))
    triv = _trivial_mask(ex, n, 0 if project_radial else n_triv, X.dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    hsteps = torch.tensor(st["hist_steps"])
    if not batched:
        ex, triv, hist = ex[0], triv[0], hist[:, 0]
    out_settings = dict(settings, renorm_every_used=st["m"])
    if st["m"] < renorm_every:
        d, m_bad, w = st["shrunk"][0]
        warnings.warn(f"lyapunov_spectrum: renorm_every={renorm_every} lets the tangents collapse onto the leading "
                      f"directions (after {m_bad} steps a column's part independent of the others was "
                      f"{_fmt_ratio(w)}, where at least sqrt(eps) = {renorm_tol:.1e} of {X.dtype} is needed, or the "
                      f"lower exponents are rounding noise); those intervals were redone, re-orthonormalising every "
                      f"{st['m']} steps (result.settings['renorm_every_used'])", RuntimeWarning, stacklevel=2)
    _warn_divergence(X, st["X"], step)
    if checkpoint:
        save(final=True)  # the result is computed: a failed write only warns
    return LyapunovResult(ex, triv, hist.cpu(), hsteps, steps, out_settings)


# ---------------------------------------------------------------------------------------------------- finite time

# sweeps of the product QR iteration after the first pass; each one shrinks the coupling between singular values
# of ratio r = sigma_j / sigma_i by r^2, and those within CLUSTER_NATS of each other are resolved by a block SVD
PRODUCT_SWEEPS = 4
CLUSTER_NATS = 10.0


def _qr_pass(chain):
    """One QR pass along a product of square factors (``chain[0]`` applied first): returns the triangular factors
    [G_1, ..., G_T] with ``F_T ... F_1 = W G_T ... G_1`` (W orthogonal), so both products have the same singular
    values."""
    out, W = [], None
    for F in chain:
        W, G = torch.linalg.qr(F if W is None else F @ W)
        out.append(G)
    return out


def product_log_svdvals(chain) -> Tensor:
    """log sigma_i of the product ``R_T ... R_1`` of float64 factors ``chain = [R_1, ..., R_T]`` ([..., n, n]),
    descending, without forming the product (whose SVD loses every sigma_i below eps * sigma_1).

    Method: PRODUCT_SWEEPS passes of the product QR iteration (alternately along the product and along its
    transpose; each pass is a float64 Householder QR per factor), which drive the triangular product towards a
    diagonal one; then the product is accumulated with every row kept at unit norm and its log scale in float64
    (no overflow or underflow), and each cluster of rows whose scales lie within CLUSTER_NATS of each other gets a
    dense SVD of its diagonal block (relative accuracy ~ eps * e^CLUSTER_NATS inside a cluster, while the coupling
    between clusters has decayed like e^(-2 * CLUSTER_NATS * sweeps)).
    """
    for i in range(PRODUCT_SWEEPS):
        chain = _qr_pass([F.mT for F in reversed(chain)]) if i % 2 == 0 else _qr_pass(chain)
    n = chain[0].shape[-1]
    s = torch.zeros(chain[0].shape[:-1], dtype=torch.float64, device=chain[0].device)  # row log scales [..., n]
    Bm = torch.eye(n, dtype=torch.float64, device=s.device).expand_as(chain[0])
    tiny = torch.finfo(torch.float64).tiny
    for F in chain:  # M <- F M with M = diag(e^s) Bm
        la = F.abs().clamp_min(tiny).log() + s.unsqueeze(-2)  # log |F_ij e^{s_j}|
        la = la.masked_fill(F == 0, float("-inf"))
        m = la.amax(-1).clamp_min(-1e300)  # [..., n]; an all-zero row keeps a finite scale
        E = torch.sign(F) * torch.exp(la - m.unsqueeze(-1))  # F_ij e^{s_j - m_i}, entries <= 1
        rows = E @ Bm
        nr = rows.norm(dim=-1).clamp_min(tiny)
        s, Bm = m + nr.log(), rows / nr.unsqueeze(-1)
    out = torch.empty_like(s)
    flat_s, flat_B, flat_o = s.reshape(-1, n), Bm.reshape(-1, n, n), out.reshape(-1, n)
    for b in range(flat_s.shape[0]):
        order = torch.argsort(flat_s[b], descending=True)
        sb, Bb = flat_s[b][order], flat_B[b][order][:, order]
        vals, i0 = [], 0
        for i in range(1, n + 1):
            if i == n or sb[i - 1] - sb[i] > CLUSTER_NATS:
                blk = torch.exp(sb[i0:i] - sb[i0]).unsqueeze(-1) * Bb[i0:i, i0:i]
                vals.append(sb[i0] + torch.linalg.svdvals(blk).clamp_min(tiny).log())
                i0 = i
        flat_o[b] = torch.sort(torch.cat(vals), descending=True).values
    return out


@renamed_kwargs(T="horizon")
def finite_time_lyapunov(step, X0: Tensor, *, C: Optional[Tensor] = None, horizon: int = 16, k: Optional[int] = None,
                         method: str = "auto", dense_max: int = 1024, backend: str = "auto", tol: float = 1e-8,
                         maxiter: int = 300, seed: int = 0, trivial_below: Optional[float] = None,
                         parallel: Optional[str] = None, group=None) -> LyapunovResult:
    """The paper's finite-horizon exponents ``lambda_i = (1/horizon) ln sigma_i(J_{horizon-1} ... J_0)`` from X0.

    ``method="dense"``: the product of the ``horizon`` dense step Jacobians (in float64) and its SVD, exact, for small S*D
    (the default when S*D <= ``dense_max``). ``method="matrix_free"``: the top-k singular values of the T-step map
    by a Krylov method (``fastjac.linalg.svds``) whose products are chains of ``horizon`` JVPs (forward) and
    VJPs (transpose), with the linearisations cached; no n x n matrix exists.

    Args:
        step, X0, C: as for :func:`lyapunov_spectrum`. horizon: the number of steps (the paper: T = 16; ``T=`` is a deprecated alias).
        k: how many leading exponents; None: all S*D (dense), 32 (matrix-free).
        tol, maxiter, seed: of the matrix-free solver.
        parallel: None, or "samples" to shard a batch across the ranks of ``group`` (:mod:`fastjac.distributed`).

    Returns:
        LyapunovResult (descending exponents [k] or [B, k], trivial mask; empty history).

    Example:
        >>> import torch, fastjac as fj
        >>> m = fj.ItrSA(8, 2, dtype=torch.float64)
        >>> res = fj.finite_time_lyapunov(m, torch.randn(5, 8, dtype=torch.float64), horizon=16)
        >>> res.exponents.shape, int(res.trivial.sum())       # 5 tokens: 5 radial directions are -inf
        (torch.Size([40]), 5)
    """
    if parallel is not None:
        from ..distributed import finite_time_lyapunov_parallel

        return finite_time_lyapunov_parallel(
            step, X0, C=C, horizon=horizon, k=k, method=method, dense_max=dense_max, backend=backend, tol=tol,
            maxiter=maxiter, seed=seed, trivial_below=trivial_below, parallel=parallel, group=group)
    X, C3, batched = _prepare(step, X0, C)
    B, S, D = X.shape
    n = S * D
    horizon = _check_int("horizon", horizon, 1)
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'matrix_free', got {method!r}")
    if method == "auto":
        method = "dense" if n <= dense_max else "matrix_free"
    if k is None:
        k = n if method == "dense" else min(32, n)
    k = _check_int("k", k, 1)
    if k > n:
        raise ValueError(f"k: expected at most S*D = {n}, got {k}")
    def trajectory(Xs, Cs):  # the horizon linearisations along the trajectory from Xs
        lins = []
        for _ in range(horizon):
            with torch.no_grad():
                lin = _lin(step, Xs, Cs, backend)
            lins.append(lin)
            Xs = lin.out
        return lins

    if method == "dense":
        check_dense_size(S, D, B * horizon, torch.float64, None)  # the chain of triangular factors is kept
        chain, W = [], None
        for lin in trajectory(X, C3):  # first QR pass on the fly: J_t W_{t-1} = W_t R_t (float64 Householder)
            with torch.no_grad():
                J = lin.dense().double()
            W, R = torch.linalg.qr(J if W is None else J @ W)
            chain.append(R)
        logsv = product_log_svdvals(chain)[..., :k]
    else:
        from ..linalg import svds

        gen = torch.Generator().manual_seed(seed)
        rows = []
        for b in range(B):  # one operator per sample: its own trajectory, B = 1 linearisations
            lins = trajectory(X[b:b + 1], C3 if C3 is None or C3.dim() == 2 else C3[b:b + 1])

            def chain(fwd, lins=lins):
                def apply(V):  # V [r, n] -> [r, n]
                    Tk = V.to(X.dtype).reshape(V.shape[0], 1, S, D)
                    with torch.no_grad():
                        for lin in (lins if fwd else reversed(lins)):
                            Tk = lin.jvp(Tk) if fwd else lin.vjp(Tk)
                    return Tk.reshape(V.shape[0], n).to(V.dtype)
                return apply

            s, ok, cycles = svds(chain(True), chain(False), n, k, dtype=X.dtype, device=X.device, tol=tol,
                                 maxiter=maxiter, seed=gen)
            if not ok:
                warnings.warn(f"finite_time_lyapunov: the matrix-free SVD of sample {b} did not reach tol={tol:g} "
                              f"in maxiter={maxiter} restart cycles; raise maxiter or lower k", RuntimeWarning)
            rows.append(s)
        logsv = torch.stack(rows).double().log()
        spread = float((logsv[:, 0] - logsv[:, -1]).max())
        if spread > math.log(1 / torch.finfo(X.dtype).eps) - math.log(1e3):
            warnings.warn(f"finite_time_lyapunov: the matrix-free SVD works on the {horizon}-step map itself, which "
                          f"resolves singular values down to about eps * sigma_max only; sigma_1 / sigma_k = "
                          f"e^{spread:.0f} here, so the lower exponents are rounding noise: use method='dense' "
                          f"(QR-accumulated, exact) or a shorter horizon", RuntimeWarning, stacklevel=2)
    ex = logsv / horizon
    triv = _trivial_mask(ex, n, trivial_count(step, S, D), X.dtype, trivial_below)
    ex = ex.masked_fill(triv, float("-inf"))
    settings = dict(method=f"finite_time_{method}", horizon=horizon, k=k, backend=backend, dtype=str(X.dtype),
                    shape=list(X0.shape), step=type(step).__name__)
    if not batched:
        ex, triv = ex[0], triv[0]
    return LyapunovResult(ex, triv, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long), horizon,
                          settings)


__all__ = ["LyapunovResult", "lyapunov_spectrum", "finite_time_lyapunov", "trivial_count", "radial_basis",
           "project_off"]
