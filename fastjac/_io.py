"""Writing results safely: an output folder proved writable before any compute, atomic files (a ``.tmp`` beside the
target, renamed over it; removed again when the write fails), strict JSON, and a fallback file in the temp folder
when a late write fails, so that a full disk or a folder turned read-only never costs a finished run.

    out = check_out_dir("runs/a", flag="--out")              # ValueError naming the flag, before the run
    atomic_write("runs/a/ckpt.pt", lambda tmp: torch.save(state, tmp))
    where = write_json("runs/a/results.json", res, what="train")   # the path written, a fallback path, or "<stdout>"
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional


def check_out_dir(out: str, flag: str = "out") -> str:
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
    from ._checks import json_safe

    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any, what: str, *, log=None) -> str:
    """Write ``obj`` as strict JSON to ``path`` (atomically); on failure to a fallback file in the temp folder,
    else to stdout. Returns where it went (a path or ``"<stdout>"``)."""
    text = json_text(obj)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    where = write_with_fallback(path, write, what, log=log)
    if where is None:
        print(text)
        return "<stdout>"
    return where


__all__ = ["check_out_dir", "check_out_file", "atomic_write", "write_with_fallback", "write_json", "json_text", "fallback_path"]
