"""fastjac's file I/O in one place: the run fingerprint, checkpoint files (atomic writes, safe reads), the output
folder check and THE strict-JSON writer every job uses.

- :func:`fingerprint`: a SHA-256 of everything that defines a run (settings, X0, C, the step's code and weights),
  so a checkpoint is resumed only by the run that wrote it.
- :func:`save_atomic` / :func:`load_checkpoint` / :func:`check_writable`: checkpoint files are written to a
  ``.tmp`` and renamed (an interrupt leaves the previous file intact) and read with
  ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts: no code in a file runs).
- :func:`check_out_dir`: a job's output folder is created and proved writable before any compute.
- :func:`write_json`: strict JSON (no bare NaN/Infinity: non-finite numbers are null); when the file cannot be
  written the text goes to a fallback file in the temp folder, else to stdout, so a finished result is never lost.

This module sits at the bottom layer (it imports nothing of fastjac but ``_checks``), so the analysis, the
distributed runs and the command-line jobs all use it without an import circle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import types
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from ._checks import json_safe


def _is_fastjac_model(m) -> bool:
    # a fastjac RecurrentStep (duck-typed: this module is below fastjac.models): its config() names its maths
    return callable(getattr(m, "config", None)) and callable(getattr(m, "step_params", None))


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
    if _is_fastjac_model(m):
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
        h.update(
            f"<{type(obj).__qualname__} {getattr(obj, '__module__', '')}."
            f"{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}>".encode()
        )
    else:  # an instance of a Python class (e.g. a callable object): its class, __call__ and attributes
        cls = type(obj)
        h.update(f"<object {cls.__module__}.{cls.__qualname__}>".encode())
        call = getattr(cls, "__call__", None)  # noqa: B004 (the class's own __call__, not callable(obj))
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


# ------------------------------------------------------------------------------------------------ checkpoint files


def start_over_hint(path: str) -> str:
    return f"delete {path!r} to start over (CLI: --fresh), or pass another checkpoint path"


def check_writable(path: str, what: str = "checkpoint") -> None:
    """Fail before any compute when the checkpoint ``path`` cannot be written (missing folder, read-only, a
    folder): ValueError naming ``what`` (:func:`check_out_file`, the one probe)."""
    check_out_file(path, what)


def save_atomic(path: str, obj: Dict[str, Any]) -> None:
    """torch.save to ``path + '.tmp'``, then rename (:func:`atomic_write`): an interrupt or a full disk leaves the
    previous file and no ``.tmp``. The write goes through a Python file object, so a full disk is an OSError (torch's
    own file writer reports it as a RuntimeError)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def load_checkpoint(path: str, device, fmt: str, keys=()) -> Dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``: no code in the file runs) and check that it says it is a
    ``fmt`` file whose ``state`` has ``keys``; else a ValueError naming ``checkpoint`` and how to start over."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint: {path!r} is empty (a write was cut off?); {start_over_hint(path)}")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated / corrupt / a pickle with objects weights_only refuses
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(
            f"checkpoint: {path!r} is not a readable fastjac checkpoint (corrupt, truncated, or not "
            f"written by lyapunov_spectrum: {type(e).__name__}: {why}); nothing in it was run. "
            f"{start_over_hint(path)}"
        ) from None
    ok = (
        isinstance(saved, dict)
        and saved.get("format") == fmt
        and isinstance(saved.get("state"), dict)
        and all(k in saved["state"] for k in keys)
        and isinstance(saved.get("rng"), list)
    )
    if not ok:
        raise ValueError(
            f"checkpoint: {path!r} is not a lyapunov_spectrum checkpoint of this fastjac version; "
            f"{start_over_hint(path)}"
        )
    return saved


# ------------------------------------------------------------------------------------------------ job outputs


def check_out_dir(out: str, flag: str = "--out") -> str:
    """Create the folder ``out`` and prove it writable (a probe file written and removed), or raise ValueError
    naming ``flag``. Called before any compute: a late failure would lose the run. Returns ``out``."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"{flag}: expected a folder path, got {out!r}")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag}: {out!r} is a file, not a folder; pass a folder")
    probe = os.path.join(out, f".fastjac_write_test_{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        _remove(probe)
        raise ValueError(f"{flag}: cannot write to {out!r} ({e.strerror or e}); pass a writable folder") from None
    return out


def check_out_file(path: str, flag: str = "path") -> str:
    """Prove that the file ``path`` can be written (its folder exists and takes a probe file; ``path`` is not a
    folder) before a long run, or raise ValueError naming ``flag``. Nothing is created or changed."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{flag}: expected a file path, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: the folder {folder!r} does not exist; create it or pass another path")
    probe = path + f".fastjac_write_test_{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        _remove(probe)
        raise ValueError(f"{flag}: cannot write {path!r} ({e.strerror or e}); pass a writable path") from None
    return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` writes the whole file to ``tmp`` (``path + ".tmp"``), which then replaces ``path`` in one
    rename: an interrupt or a full disk leaves the previous ``path`` intact and no ``.tmp`` behind (it is removed
    whatever went wrong, then the error is raised again)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def fallback_path(what: str, ext: str) -> str:
    """A fresh file name in the temp folder for results that could not be written where asked."""
    return os.path.join(tempfile.gettempdir(), f"fastjac_{what}_{os.getpid()}_{int(time.time() * 1000)}{ext}")


def write_with_fallback(path: str, write: Callable[[str], Any], what: str, *, log=None) -> Optional[str]:
    """Write ``path`` atomically with ``write(tmp)``; when that fails with an OSError, say so on stderr and write a
    fallback file in the temp folder instead. Returns where the file is, or None when both writes failed."""
    log = log or (lambda m: print(m, file=sys.stderr))
    try:
        atomic_write(path, write)
        return path
    except OSError as e:
        log(f"fastjac: could not write {path!r} ({e.strerror or e})")
    fb = fallback_path(what, os.path.splitext(path)[1])
    try:
        atomic_write(fb, write)
        log(f"fastjac: wrote {fb} instead")
        return fb
    except OSError as e:
        log(f"fastjac: nor the fallback {fb!r} ({e.strerror or e})")
        return None


def json_text(obj: Any, indent: Optional[int] = 1) -> str:
    """Strict JSON (non-finite floats as null, tensors as lists): what any JSON reader accepts."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any, what: str = "result", *, fallback: bool = True, log=None) -> str:
    """Write ``obj`` as strict JSON to ``path`` (atomically). When that fails (full disk, folder gone) and
    ``fallback``: to a fallback file in the temp folder, else to stdout, each time saying so on stderr; with
    ``fallback=False`` the OSError is raised (the API's ``save_json``). Returns where the text went (a path or
    ``"<stdout>"``).

    Example:
        >>> import os, tempfile
        >>> p = write_json(os.path.join(tempfile.mkdtemp(), "r.json"), {"x": float("nan")})
        >>> import json; json.load(open(p))
        {'x': None}
    """
    text = json_text(obj)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    if not fallback:
        atomic_write(path, write)
        return path
    where = write_with_fallback(path, write, what, log=log)
    if where is None:
        print(text)
        return "<stdout>"
    return where
