"""``backend="cpp"``: fastjac models on the compiled C++ CPU kernels of ``csrc/`` (torch custom ops).

The extension is compiled just in time against the installed torch (``torch.utils.cpp_extension.load`` with
ninja; nothing is compiled at install or import time) and cached per torch version, Python, machine and source
hash under ``$FASTJAC_CPP_CACHE`` (default ``~/.cache/fastjac/cpp``). The first build takes 30-50 s on a 2-core
machine; later processes load the cached library in well under a second. ``python -m fastjac build`` builds it
ahead of time (CI, a cluster's login node).

When "auto" picks it: fastjac models (ItrSA, AKOrN) on CPU tensors, float32/float64, once the library is loaded in
this process or found in the build cache ("auto" never starts a compile; ``backend="cpp"`` by name does), and only
when no gradient could be wanted: the kernels are not differentiable in the weights, so with grad mode on and X or
a model parameter requiring grad "auto" declines it (``fj.info`` says so). Analysis loops (``lyapunov_spectrum``,
spectra) run under no_grad and get it.

Ops (``torch.ops.fastjac.*``, fake implementations registered here so they trace under torch.compile and pass
``torch.library.opcheck``): ``attn_jvp`` (k-tangent attention JVP), ``norm_residual_jvp`` (residual +
normalisation JVP) and ``step_dense_`` (the dense Jacobian writer). See docs/cpp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from ..models import AKOrN, ItrSA
from .base import KernelBackend, needs_weight_grad

SUPPORTED_DTYPES = (torch.float32, torch.float64)
SOURCES = ("register.cpp", "attn_jvp.cpp", "flash_attn.cpp", "norm_jvp.cpp", "step_dense.cpp")
HEADERS = ("common.h",)
CFLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
)
LDFLAGS = ("-fopenmp",)
LIB_NAME = "fastjac_cpp"
# csrc/common.h FASTJAC_CPP_ABI: a library without this tag (a foreign or stale .so) is rebuilt, never loaded
ABI = 2
ABI_TAG = f"fastjac-cpp-abi-{ABI};".encode()
OPS = ("attn_jvp", "norm_residual_jvp", "step_dense_", "flash_fwd", "flash_jvp", "step_dense_flash_", "abi_version")
# how long a build waits for another process's build of the same cache folder before it gives up, saying why
LOCK_TIMEOUT_S = float(os.environ.get("FASTJAC_CPP_LOCK_TIMEOUT", "900"))

_lock = threading.Lock()
_loaded: Optional[str] = None  # path of the library loaded in this process
_error: Optional[str] = None  # why the last build or load failed
_fakes_done = False
_probe: dict = {}  # per-process cache of the toolchain probe and the build key (cleared by an explicit build)


# ------------------------------------------------------------------------------------------------ build and cache


def source_dir() -> Optional[Path]:
    """The folder holding the C++ sources: ``fastjac/_csrc`` in an installed wheel, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent.parent  # the fastjac package
    for d in (here / "_csrc", here.parent / "csrc"):
        if all((d / f).is_file() for f in SOURCES + HEADERS):
            return d
    return None


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def _forget_probe() -> None:
    """Drop the cached toolchain probe and source hash (an explicit build re-reads both)."""
    _probe.clear()


def toolchain_why_not() -> Optional[str]:
    """None if this machine can build the extension, else why not (no sources, compiler or ninja).

    Probed once per process (``ninja --version`` is a subprocess): "auto" asks on every call."""
    if "why" not in _probe:
        _probe["why"] = _toolchain_why_not()
    return _probe["why"]


def _toolchain_why_not() -> Optional[str]:
    if source_dir() is None:
        return "the C++ sources (csrc/) are not in this install"
    if sys.platform == "win32":
        return "the C++ extension is built on Linux and macOS only"
    if _compiler() is None:
        return "no C++ compiler found (set CXX or install g++/clang++)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _machine_key() -> str:
    cpu = platform.processor() or ""
    try:  # -march=native: the CPU's features decide the code, so they key the cache
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    cpu += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return platform.machine() + cpu


def build_key() -> str:
    """The cache folder's name: torch version, Python, machine and a hash of sources, flags and CPU features.

    Hashed once per process (the sources do not change under a running process; an explicit build re-hashes)."""
    if "key" not in _probe:
        _probe["key"] = _build_key()
    return _probe["key"]


def _build_key() -> str:
    h = hashlib.sha256()
    d = source_dir()
    for f in SOURCES + HEADERS:
        h.update(f.encode())
        if d is not None:
            h.update((d / f).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(_machine_key().encode())
    h.update((os.environ.get("CXX", "") + str(_compiler())).encode())
    tv = torch.__version__.replace("+", "_")
    return f"torch{tv}-py{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}-{h.hexdigest()[:16]}"


def cache_dir() -> Path:
    """Where this torch/machine's build lives: ``$FASTJAC_CPP_CACHE/<build_key()>``.

    Example:
        >>> from fastjac.backends import cpp
        >>> cpp.cache_dir().name.startswith("torch")
        True
    """
    root = os.environ.get("FASTJAC_CPP_CACHE")
    if not root:
        root = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastjac", "cpp"
        )
    return Path(root) / build_key()


def _lib_file() -> Path:
    return cache_dir() / f"{LIB_NAME}.so"


def _has_tag(lib: Path) -> bool:
    """Whether ``lib`` is a fastjac library of this ABI (the tag string is in the file), without loading it: a
    foreign .so once dlopen-ed could not be replaced in this process."""
    try:
        return ABI_TAG in lib.read_bytes()
    except OSError:
        return False


def is_loaded() -> bool:
    """Whether the compiled ops are loaded in this process."""
    return _loaded is not None


def is_built() -> bool:
    """Whether the library for this torch and machine is in the build cache (loading it compiles nothing)."""
    return _loaded is not None or _lib_file().is_file()


def build_info() -> dict:
    """What the last build on this machine recorded (compile seconds, date, torch), or {} if none."""
    try:
        return json.loads((cache_dir() / "build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _cache_error(path: Path, e: OSError) -> RuntimeError:
    return RuntimeError(
        f"the C++ build cache {path} is not writable ({type(e).__name__}: {e}); set "
        "FASTJAC_CPP_CACHE to a writable folder"
    )


@contextlib.contextmanager
def _build_lock(out: Path, timeout: Optional[float] = None):
    """An exclusive ``fcntl.flock`` on ``out/fastjac.lock`` for the duration of a build.

    The kernel releases it when its holder dies (SIGKILL included), so a killed build can never block later ones;
    waiting for a live one is bounded (``FASTJAC_CPP_LOCK_TIMEOUT`` seconds, default 900) and the error names the
    lock file. While it is held no other fastjac build of this folder runs, so torch's own lock file there
    (``out/lock``, which a killed build leaves behind and torch then waits on forever) is stale and removed."""
    import fcntl

    path = out / "fastjac.lock"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _cache_error(out, e) from e
    limit = LOCK_TIMEOUT_S if timeout is None else timeout
    t0 = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > limit:
                    raise RuntimeError(
                        f"another process has been building the C++ extension for over {limit:.0f} "
                        f"s (it holds the lock {path}); wait for it, or end it (a dead holder "
                        "releases the lock by itself), or raise FASTJAC_CPP_LOCK_TIMEOUT"
                    ) from None
                time.sleep(0.1)
        try:
            (out / "lock").unlink()  # torch's FileBaton of a killed build: stale, since we hold the build lock
        except FileNotFoundError:
            pass
        yield path
    finally:
        os.close(fd)  # releases the flock


def _verify() -> None:
    """Every op of this ABI is registered by the loaded library (a wrong library fails here, not in a model)."""
    ns = torch.ops.fastjac
    missing = [op for op in OPS if not hasattr(ns, op)]
    if missing:
        raise RuntimeError(f"the loaded library does not register the ops {missing}")
    v = ns.abi_version()
    if v != ABI:
        raise RuntimeError(f"the loaded library has ABI version {v}, expected {ABI}")


def _load_file(lib: Path) -> str:
    global _loaded, _error
    torch.ops.load_library(str(lib))
    _verify()
    _loaded, _error = str(lib), None
    _register_fakes()
    return _loaded


def load(build: bool = True, verbose: bool = False, force: bool = False) -> str:
    """Load the compiled ops into this process, compiling them first if needed (and ``build``). Returns the
    library's path; raises RuntimeError saying why it cannot.

    A cached file is loaded only if it carries this version's tag (``ABI_TAG``) and, once loaded, registers every
    op in ``OPS``; otherwise it is rebuilt (``build``) or refused with the reason."""
    global _loaded, _error
    with _lock:
        if _loaded is not None and not force:
            return _loaded
        if force:
            _forget_probe()
        reason = toolchain_why_not()
        lib = _lib_file()
        if lib.is_file() and not force:
            if _has_tag(lib):
                try:
                    return _load_file(lib)
                except Exception as e:
                    _error = f"loading {lib} failed ({type(e).__name__}: {e})"
                    raise RuntimeError(
                        _error + ": delete it, or run `python -m fastjac build --force` in a new process"
                    ) from e
            _error = f"{lib} is not a fastjac C++ library of this version (no tag {ABI_TAG.decode()!r})"
            if not build or reason is not None:
                raise RuntimeError(_error + ": run `python -m fastjac build` to rebuild it")
        if not build:
            raise RuntimeError(f"the C++ extension is not built for this torch/machine (no {lib})")
        if reason is not None:
            _error = reason
            raise RuntimeError(reason)
        if _loaded is not None:
            raise RuntimeError("the C++ extension is already loaded in this process: rebuild it in a new one")
        return _build(verbose, force)


def _build(verbose: bool, force: bool) -> str:
    global _error
    from torch.utils.cpp_extension import load as _jit_load

    d, out = source_dir(), cache_dir()
    lib = out / f"{LIB_NAME}.so"
    with _build_lock(out):
        if not force and lib.is_file() and _has_tag(lib):  # another process built it while we waited
            return _load_file(lib)
        try:
            if lib.exists():
                lib.unlink()  # stale or foreign: never load it
        except OSError as e:
            raise _cache_error(out, e) from e
        t0 = time.perf_counter()
        try:
            _jit_load(
                name=LIB_NAME,
                sources=[str(d / f) for f in SOURCES],
                extra_include_paths=[str(d)],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(out),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:
            _error = f"building the C++ extension failed ({type(e).__name__}: {str(e).strip()[-2000:]})"
            raise RuntimeError(_error) from e
        secs = time.perf_counter() - t0
        info = dict(
            compile_s=round(secs, 1),
            date=time.strftime("%Y-%m-%dT%H:%M:%S"),
            torch=torch.__version__,
            compiler=_compiler(),
            cflags=list(CFLAGS),
            cpu_count=os.cpu_count(),
        )
        try:
            (out / "build_info.json").write_text(json.dumps(info, indent=1))
        except OSError as e:
            raise _cache_error(out, e) from e
        _verify()
        global _loaded
        _loaded, _error = str(lib), None
        _register_fakes()
        return _loaded


def _register_fakes() -> None:
    """Fake (meta) implementations: output shapes and dtypes only, for torch.compile and opcheck."""
    global _fakes_done
    if _fakes_done:
        return
    lib = torch.library

    @lib.register_fake("fastjac::attn_jvp")
    def _attn_jvp_fake(A, q, k, v, o, qd, kd, vd, beta, causal):
        K, B, H, S, _ = qd.shape
        return q.new_empty((K, B, S, H, v.shape[-1]))

    @lib.register_fake("fastjac::flash_fwd")
    def _flash_fwd_fake(q, k, v, scale, causal, bias, block_m, block_n):
        B, H, L, _ = q.shape
        return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L))

    @lib.register_fake("fastjac::flash_jvp")
    def _flash_jvp_fake(q, k, v, o, lse, qd, kd, vd, scale, causal, bias, block_m, block_n):
        K, B, H, L, _ = qd.shape
        return q.new_empty((K, B, L, H, v.shape[-1]))

    @lib.register_fake("fastjac::norm_residual_jvp")
    def _norm_fake(T, R, w, s, gamma, eta, kind, group):
        return torch.empty_like(T, memory_format=torch.contiguous_format)

    @lib.register_fake("fastjac::step_dense_")
    def _dense_fake(A, R1, U, rb, Ed, out, i0):
        return None

    @lib.register_fake("fastjac::step_dense_flash_")
    def _dense_flash_fake(q, k, vo, oo, L, E, wvoT, wq, wk, eta, beta, causal, out):
        return None

    _fakes_done = True


def ops():
    """``torch.ops.fastjac`` once the library is loaded (building it on first use)."""
    load()
    return torch.ops.fastjac


# ------------------------------------------------------------------------------------------------------ backend


class CppBackend(KernelBackend):
    name = "cpp"

    def why_not(self, step, X: Tensor) -> Optional[str]:
        reason = self.model_why_not(step)
        if reason is not None:
            return reason
        if X.device.type != "cpu":
            return f"X is on {X.device.type}: the C++ kernels are CPU kernels"
        if X.dtype not in SUPPORTED_DTYPES:
            return f"dtype {X.dtype} is not supported by the C++ kernels: float32 or float64"
        if _loaded is None:
            reason = toolchain_why_not()
            if reason is not None and not _lib_file().is_file():
                return f"the C++ extension cannot be built: {reason}"
        return None

    def auto_why_not(self, step, X: Tensor) -> Optional[str]:
        reason = self.why_not(step, X)
        if reason is not None:
            return reason
        reason = needs_weight_grad(step, X)
        if reason is not None:
            return reason
        if _loaded is None:
            if not _lib_file().is_file():
                return (
                    "the C++ extension is not built yet and 'auto' does not start a compile (run "
                    "`python -m fastjac build` once, or pass backend='cpp', which builds it: ~30-50 s)"
                )
            try:
                load(build=False)
            except RuntimeError as e:
                return f"the cached C++ extension failed to load ({e})"
        return None

    def linearize(self, step, X, C, batched):
        load()  # by name: builds on first use
        return super().linearize(step, X, C, batched)


def _itrsa(step, X, C):
    from ..ops.step.cpp import CppItrSALinearization

    return CppItrSALinearization(X, C, step.step_params())


def _akorn(step, X, C):
    from ..ops.step.cpp import CppAKOrNLinearization

    return CppAKOrNLinearization(X, C, step.step_params())


def make_backend() -> CppBackend:
    be = CppBackend()
    be.register(ItrSA, _itrsa)
    be.register(AKOrN, _akorn)
    return be


# --------------------------------------------------------------------------------------- python -m fastjac build


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fastjac build [--force] [--verbose]``: compile (or find) the C++ extension and say where."""
    ap = argparse.ArgumentParser(
        prog="fastjac build",
        description="build the compiled C++ extension (backend='cpp') for this torch and machine, ahead of first use",
    )
    ap.add_argument("--force", action="store_true", help="recompile even if a cached build exists")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args([] if argv is None else list(argv))
    _forget_probe()  # an explicit build re-probes the toolchain and re-hashes the sources
    reason = toolchain_why_not()
    if reason is not None and not (is_built() and not args.force):
        print(f"fastjac build: cannot build the C++ extension: {reason}", file=sys.stderr)
        return 1
    if args.force:
        shutil.rmtree(cache_dir(), ignore_errors=True)
    cached = _lib_file().is_file() and _has_tag(_lib_file())
    t0 = time.perf_counter()
    try:
        path = load(build=True, verbose=args.verbose)
    except RuntimeError as e:
        print(f"fastjac build: {e}", file=sys.stderr)
        return 1
    secs = time.perf_counter() - t0
    what = "found in the cache" if cached else f"compiled in {secs:.1f} s"
    print(f"fastjac build: C++ extension {what}: {path}")
    return 0
