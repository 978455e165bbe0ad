"""Your own model as a fastjac step: ``fj.as_step`` (adapt a layer) and ``fj.check_step`` (find the traps).

fastjac's callable path (``backend="autograd"``) runs ``torch.func`` on any ``X -> X`` callable, inside
:func:`fastjac.nn.attention.forward_ad` (PyTorch's SDPA becomes a forward-mode-capable one). What can still go
wrong with a third-party layer, and what these two functions do about it:

- the layer needs extra arguments (masks, rotary position embeddings) or returns a tuple (HF layers):
  ``as_step(layer, *args, **kwargs)`` binds them and selects the hidden states;
- a fused kernel without forward AD (other than SDPA and the MHA fast path, which forward_ad() handles) raises
  ``NotImplementedError: Trying to use forward AD with ...``: check_step names the op and the fix;
- silent traps: a ``@torch.jit.script`` helper can return zero tangents under forward AD (a PyTorch bug), a float64
  step may compute in float32 inside, dropout makes the step random. check_step compares one JVP against central
  finite differences (float64) and warns.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn


class AsStep(nn.Module):
    """A layer as an ``X -> X`` step (see :func:`as_step`). ``trivial_count(S, D)`` states how many exponents its
    final normalisation makes -inf."""

    def __init__(self, module: Callable, args, kwargs, select, trivial_per_token: int):
        super().__init__()
        self.module, self.args, self.kwargs, self.select = module, tuple(args), dict(kwargs), select
        self.trivial_per_token = trivial_per_token

    def forward(self, X: Tensor) -> Tensor:
        unbatched = X.dim() == 2
        y = self.module(X.unsqueeze(0) if unbatched else X, *self.args, **self.kwargs)
        if isinstance(y, (tuple, list)):
            y = y[self.select]
        elif not isinstance(y, Tensor) and hasattr(y, "__getitem__"):  # a ModelOutput-like mapping
            y = y[self.select]
        if not isinstance(y, Tensor):
            raise TypeError(
                f"module: expected it to return a Tensor (or a tuple holding one at index "
                f"{self.select}), got {type(y).__name__}"
            )
        return y[0] if unbatched else y

    def trivial_count(self, S: int, D: int) -> int:
        """Exponents the final normalisation of the layer makes exactly -inf (per token, times S)."""
        return self.trivial_per_token * S

    def extra_repr(self) -> str:
        return f"trivial exponents per token: {self.trivial_per_token}"


def _final_norm_trivial(module) -> int:
    """Directions per token a post-norm layer's final normalisation kills: LayerNorm 2 (mean and scale), RMSNorm 1
    (scale); 0 for a pre-norm (residual-output) layer or an unknown one."""
    if isinstance(module, nn.TransformerEncoderLayer):
        if module.norm_first:
            return 0
        return 2 if isinstance(module.norm2, nn.LayerNorm) else 1
    name = type(module).__name__
    if name in ("BertLayer", "RobertaLayer", "ElectraLayer"):  # post-LN: output.LayerNorm(h + ffn(h))
        return 2
    return 0


def as_step(module: Callable, *args, select: int = 0, trivial_per_token: Optional[int] = None, **kwargs) -> AsStep:
    """Wrap a layer as a step ``X -> X`` for fastjac: ``step(X) = module(X, *args, **kwargs)[select]``.

    For layers that need masks or position embeddings or return tuples (HF ``BertLayer``, ``LlamaDecoderLayer``).
    An unbatched X [S, D] is passed as [1, S, D] (HF layers need the batch dim) and the result squeezed back.

    Args:
        module: the layer (any callable). args, kwargs: passed on every call (masks, ``position_embeddings``...).
        select: which element of a tuple output is the new state (0: hidden states, HF's convention).
        trivial_per_token: exponents per token that the layer's final normalisation makes -inf. Default: 2 for
            post-LN layers (``nn.TransformerEncoderLayer(norm_first=False)``, ``BertLayer``: LayerNorm kills the
            mean and the scale direction of every token), 1 for a post-RMSNorm, 0 for pre-norm layers
            (``norm_first=True``, Llama/GPT-2 blocks: their output is a residual sum, nothing is killed).
            ``step.trivial_count(S, D)`` states it; the ``k`` leading exponents are unaffected unless
            ``k > S*D - trivial_count``.

    Example:
        >>> import torch, fastjac as fj
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        >>> step = fj.as_step(layer.eval())
        >>> step.trivial_count(5, 16)
        10
        >>> fj.jvp(step, torch.randn(5, 16), torch.randn(3, 5, 16))[1].shape
        torch.Size([3, 5, 16])
    """
    if not callable(module):
        raise TypeError(f"module: expected a callable (an nn.Module), got {type(module).__name__}")
    if isinstance(select, bool) or not isinstance(select, int):
        raise TypeError(f"select: expected an int, got {type(select).__name__}")
    if trivial_per_token is None:
        trivial_per_token = _final_norm_trivial(module)
    elif isinstance(trivial_per_token, bool) or not isinstance(trivial_per_token, int) or trivial_per_token < 0:
        raise ValueError(f"trivial_per_token: expected an int >= 0, got {trivial_per_token!r}")
    return AsStep(module, args, kwargs, select, trivial_per_token)


# ----------------------------------------------------------------------------------------------------------------
# check_step
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepCheck:
    """What :func:`check_step` found. ``ok``: the tiny JVP ran and no warning was raised."""

    ok: bool
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    sdpa_calls: int = 0
    fd_rel_error: Optional[float] = None

    def __str__(self) -> str:
        lines = [
            f"check_step: {'ok' if self.ok else 'PROBLEMS'} (SDPA calls routed per step: {self.sdpa_calls}"
            + ("" if self.fd_rel_error is None else f"; JVP vs finite differences: {self.fd_rel_error:.1e}")
            + ")"
        ]
        lines += [f"  error: {e}" for e in self.errors] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


_FIXES = [
    (
        "_scaled_dot_product",
        "a fused SDPA kernel was reached without fastjac's routing: keep "
        "fastjac.config.sdpa_forward_ad=True (the default) or wrap the call in "
        "fastjac.nn.attention.forward_ad()",
    ),
    (
        "_transformer_encoder_layer_fwd",
        "the fused nn.TransformerEncoderLayer fast path was taken: "
        "fastjac.nn.attention.forward_ad() (entered by backend='autograd') turns it off; "
        "or torch.backends.mha.set_fastpath_enabled(False)",
    ),
    (
        "_native_multi_head_attention",
        "the fused nn.MultiheadAttention fast path was taken: fastjac.nn.attention.forward_ad() turns it off",
    ),
    (
        "dropout_p",
        "the step applies attention dropout: call model.eval() (or set dropout to 0) before taking Jacobians",
    ),
    (
        "expected it to return a Tensor",
        "the step returns a tuple or a model output: wrap it with fj.as_step(module, ..., select=0)",
    ),
    ("must map X to X's shape", "the step changes the shape: a step must map [S, D] to [S, D]"),
    (
        "Trying to use forward AD with",
        "this op has no forward-mode derivative in PyTorch and fastjac does not "
        "replace it (only SDPA and the MHA fast path are covered): write that part "
        "with plain torch ops (attention written with softmax already works)",
    ),
]


def _modules_of(step) -> List[nn.Module]:
    """The modules a step uses: itself if it is one, plus modules it closes over or names as globals."""
    found = []
    if isinstance(step, nn.Module):
        found.append(step)
    fn = getattr(step, "__func__", step)
    if inspect.isfunction(fn):
        try:
            cv = inspect.getclosurevars(fn)
            for v in list(cv.nonlocals.values()) + list(cv.globals.values()):
                if isinstance(v, nn.Module):
                    found.append(v)
        except (TypeError, ValueError):  # pragma: no cover - builtins
            pass
    return found


def _script_functions(mods: List[nn.Module], step) -> List[str]:
    """TorchScript functions and modules reachable from the step's forward code (their globals) or submodules."""
    names = []
    funcs = [getattr(step, "__func__", step)] if inspect.isfunction(getattr(step, "__func__", step)) else []
    for m in mods:
        for sub in m.modules():
            if isinstance(sub, torch.jit.ScriptModule):
                names.append(f"TorchScript module {type(sub).__name__}")
            f = getattr(type(sub), "forward", None)
            if inspect.isfunction(f):
                funcs.append(f)
    seen = set()
    for f in funcs:
        refs = [(k, v) for k, v in getattr(f, "__globals__", {}).items() if k in f.__code__.co_names]
        for k, c in zip(f.__code__.co_freevars, f.__closure__ or ()):
            try:
                refs.append((k, c.cell_contents))
            except ValueError:  # an empty cell
                pass
        for k, v in refs:
            if isinstance(v, torch.jit.ScriptFunction) and k not in seen:
                seen.add(k)
                names.append(f"@torch.jit.script function {k!r}")
    return names


class _DtypeSpy:
    """Collects the floating dtypes of the results of torch calls made by the step (a TorchFunctionMode)."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        spy = self
        self.dtypes = set()

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, Tensor) and t.is_floating_point():
                        spy.dtypes.add(t.dtype)
                return out

        self.mode = Mode()


def check_step(step, X: Tensor, *, C: Optional[Tensor] = None, fd_tol: float = 1e-5, seed: int = 0) -> StepCheck:
    """Run one tiny JVP of ``step`` at X through fastjac's callable path and report problems and their fixes.

    Errors (the JVP failed): the known forward-AD failures (a fused SDPA or MHA / encoder fast path reached, a
    fused op with no forward derivative, attention dropout, a tuple output) each with the fix. Warnings (the
    JVP ran but may be wrong): TorchScript functions/modules in the step (they can return zero tangents under forward
    AD), dropout layers in training mode (a random map), a float64 X computed in lower precision inside, and
    a JVP that disagrees with central finite differences (relative error > ``fd_tol``, checked in float64).

    Args:
        step: any callable X -> X (or X, C -> X). X: [S, D] or [B, S, D] (keep it small: this runs 3 forwards).
        C: passed on as fastjac passes it. fd_tol: the finite-difference tolerance. seed: draws the tangent.

    Returns:
        StepCheck (``.ok``, ``.errors``, ``.warnings``, ``.sdpa_calls``, ``.fd_rel_error``; ``print`` it).

    Example:
        >>> import torch, fastjac as fj
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).double().eval()
        >>> fj.check_step(layer, torch.randn(5, 16, dtype=torch.float64)).ok
        True
    """
    from . import api, config
    from .nn import attention as A

    if not isinstance(X, Tensor):
        raise TypeError(f"X: expected a Tensor, got {type(X).__name__}")
    if not callable(step):
        raise TypeError(f"step: expected a callable, got {type(step).__name__}")
    res = StepCheck(ok=True)
    mods = _modules_of(step)
    for m in mods:
        for name, sub in m.named_modules():
            p = getattr(sub, "p", None) if isinstance(sub, nn.modules.dropout._DropoutNd) else None
            if p is None and isinstance(sub, nn.MultiheadAttention):
                p = sub.dropout
            if sub.training and p:
                res.warnings.append(
                    f"dropout {p} is on in {type(sub).__name__} {name or '(the step)'!r} "
                    f"(training mode): the step is random, its Jacobian changes per call; call "
                    f".eval() or set dropout to 0"
                )
    for n in _script_functions(mods, step):
        res.warnings.append(
            f"{n}: TorchScript can return zero tangents under forward AD (a known PyTorch bug, "
            f"in grad mode); replace it by the plain Python function"
        )
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(X.shape, generator=g, dtype=torch.float64).to(dtype=X.dtype, device=X.device)
    spy = _DtypeSpy()
    try:
        with spy.mode:
            Y, JT = api.jvp(step, X, T, C=C, backend="autograd")
    except Exception as e:  # the point of check_step: turn the failure into its fix
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        fix = next((f for key, f in _FIXES if key in str(e)), None)
        res.errors.append(msg + (f" -> fix: {fix}" if fix else ""))
        res.ok = False
        return res
    call = (lambda x: step(x)) if C is None else (lambda x: step(x, C))
    before = A.routed_calls()
    with torch.no_grad(), A.forward_ad():
        call(X)
    res.sdpa_calls = A.routed_calls() - before
    if not config.sdpa_forward_ad:
        res.warnings.append("fastjac.config.sdpa_forward_ad is False: SDPA calls are not routed")
    if X.dtype == torch.float64:
        low = sorted(str(d) for d in spy.dtypes if d != torch.float64)
        if low:
            res.warnings.append(
                f"X is float64 but the step computes in {', '.join(low)} inside: its Jacobian has "
                f"that precision (cast the module with .double())"
            )
        # one central difference in float64 catches silent zero tangents of any origin
        h = 1e-6 * max(1.0, float(X.abs().max()))
        with torch.no_grad(), A.forward_ad():
            fd = (call(X + h * T) - call(X - h * T)) / (2 * h)
        err = float((JT.detach() - fd).norm() / fd.norm().clamp_min(1e-300))
        res.fd_rel_error = err
        if not math.isfinite(err) or err > fd_tol:
            why = (
                "the lower precision inside (above) makes the difference quotient noisy; fix that first"
                if low
                else "some part of the step returns wrong tangents under forward AD (a TorchScript helper, a "
                "custom autograd.Function without jvp, a detach)"
            )
            res.warnings.append(f"the JVP differs from central finite differences by {err:.1e} (relative): {why}")
    res.ok = not res.warnings
    return res


__all__ = ["AsStep", "StepCheck", "as_step", "check_step"]
