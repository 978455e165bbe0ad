"""``forward_ad()``: route PyTorch's SDPA to fastjac's forward-mode-capable one, inside a ``with`` block.

Shaped like ``torch.nn.attention.sdpa_kernel``::

    import torch, fastjac as fj
    from fastjac.nn.attention import forward_ad
    layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True).eval()
    with forward_ad():
        Y, JT = torch.func.jvp(layer, (X,), (T,))      # works: no fused kernel without forward AD is reached

What it does while active (in the entering thread; restored on exit, re-entrant, nestable):

1. ``torch.nn.functional.scaled_dot_product_attention`` calls go to
   :func:`fastjac.nn.functional.scaled_dot_product_attention`, however the caller got hold of the function:
   a ``TorchFunctionMode`` catches calls to the builtin (``from torch.nn.functional import
   scaled_dot_product_attention`` done at import time by a third-party module escapes any monkeypatch), and the
   module attribute is swapped for a dispatcher (``F.multi_head_attention_forward`` runs inside the mode's handler,
   where the mode is popped, and looks the name up in its module).
2. The fused fast paths of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode
   (``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``: no forward AD, and they never
   call SDPA) are switched off with ``torch.backends.mha.set_fastpath_enabled(False)``. That flag is process-wide:
   while any thread is inside ``forward_ad()``, other threads' MHA layers take the (equal, slower) non-fused path.
   The attribute swap is process-wide too, but its dispatcher routes only threads that are inside the block.

fastjac's callable path (``backend="autograd"``: ``fj.jvp``, ``fj.lyapunov_spectrum``, ... on any step callable)
enters this automatically; ``fastjac.config.settings(sdpa_forward_ad=False)`` opts out.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import functional as _fn

_ORIG = _fn._ORIG_SDPA
_local = threading.local()
_lock = threading.Lock()
_global = {"count": 0, "fastpath": None}


def active() -> bool:
    """True inside a ``forward_ad()`` block of the calling thread."""
    return getattr(_local, "depth", 0) > 0


def routed_calls() -> int:
    """How many SDPA calls the calling thread's forward_ad() blocks have routed so far (for ``fj.info``)."""
    return getattr(_local, "calls", 0)


def _route(args, kwargs):
    _local.calls = getattr(_local, "calls", 0) + 1
    return _fn.scaled_dot_product_attention(*args, **kwargs)


def _dispatch(*args, **kwargs):
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while some thread is inside forward_ad()."""
    if active():
        return _route(args, kwargs)
    return _ORIG(*args, **kwargs)


class _RouteSDPA(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _ORIG:
            return _route(args, kwargs or {})
        return func(*args, **(kwargs or {}))


_preloaded = []


def _preload_jvp_decompositions() -> None:
    """torch loads its forward-AD decompositions on the first dual tensor, through torch.jit.script, which warns
    DeprecationWarning from inside torch on 2.13: load them once here, that warning silenced (it is torch's, not
    the user's code's)."""
    if _preloaded:
        return
    _preloaded.append(True)
    import warnings

    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            load()


class forward_ad(contextlib.ContextDecorator):
    """Context manager (and decorator): inside it, ``torch.nn.functional.scaled_dot_product_attention`` is
    :func:`fastjac.nn.functional.scaled_dot_product_attention` and the fused MHA / encoder fast paths are off, so
    every ``torch.func`` transform works through nn.MultiheadAttention, nn.TransformerEncoderLayer and HF layers.

    Example:
        >>> import torch
        >>> from fastjac.nn.attention import forward_ad
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
        >>> X = torch.randn(1, 5, 16)
        >>> with forward_ad():
        ...     Y, JT = torch.func.jvp(layer, (X,), (torch.randn_like(X),))
        >>> JT.shape
        torch.Size([1, 5, 16])
    """

    def __enter__(self):
        _preload_jvp_decompositions()
        with _lock:
            if _global["count"] == 0:
                _global["fastpath"] = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                F.scaled_dot_product_attention = _dispatch
            _global["count"] += 1
        _local.depth = getattr(_local, "depth", 0) + 1
        if not hasattr(_local, "modes"):
            _local.modes = []
        mode = _RouteSDPA()
        mode.__enter__()
        _local.modes.append(mode)
        return self

    def __exit__(self, *exc):
        mode = _local.modes.pop()
        mode.__exit__(*exc)
        _local.depth -= 1
        with _lock:
            _global["count"] -= 1
            if _global["count"] == 0:
                F.scaled_dot_product_attention = _ORIG
                torch.backends.mha.set_fastpath_enabled(_global["fastpath"])
        return False


__all__ = ["active", "forward_ad", "routed_calls"]
