"""Building and loading the C++ extension: a killed build leaves no lock behind, a wrong cached library is refused
and repaired, an unwritable cache folder is named, and "auto" probes the toolchain once per process.

The builds here replace ``torch.utils.cpp_extension.load`` by a stand-in that takes torch's own lock file
(``FileBaton``, as torch's JIT build does) and then copies the real library built by this test session (so no test
compiles twice); everything else is the real code path in a fresh process with its own ``FASTJAC_CPP_CACHE``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastjac as fj
from fastjac.backends import cpp as cppb

ROOT = Path(__file__).resolve().parent.parent

_why = cppb.toolchain_why_not()
if _why is not None and not cppb.is_built():
    pytest.skip(f"the C++ extension cannot be built here: {_why}", allow_module_level=True)


@pytest.fixture(scope="module")
def real_lib():
    return cppb.load()


# a build whose compile step is replaced (see the module docstring); MODE=hang holds the locks until killed
_BUILD = textwrap.dedent("""
    import os, shutil, sys, time
    import torch, torch.utils.cpp_extension as ce
    from torch.utils.file_baton import FileBaton

    def fake_load(name, sources, build_directory, **kw):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            if os.environ["MODE"] == "hang":
                open(os.path.join(build_directory, "started"), "w").close()
                time.sleep(600)
            shutil.copy(os.environ["REAL_LIB"], os.path.join(build_directory, name + ".so"))
            baton.release()
        else:
            baton.wait()  # torch waits while its lock file exists: forever, if a killed build left it
        torch.ops.load_library(os.path.join(build_directory, name + ".so"))

    ce.load = fake_load
    from fastjac.backends import cpp
    sys.exit(cpp.main([]))
""")


def _env(cache, **extra):
    env = dict(
        os.environ,
        FASTJAC_CPP_CACHE=str(cache),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    )
    return env


def _run_build(cache, real_lib, mode="copy", timeout=120):
    return subprocess.run(
        [sys.executable, "-c", _BUILD],
        env=_env(cache, MODE=mode, REAL_LIB=real_lib),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_a_killed_build_does_not_block_the_next(tmp_path, real_lib):
    out = tmp_path / cppb.build_key()
    child = subprocess.Popen(
        [sys.executable, "-c", _BUILD],
        env=_env(tmp_path, MODE="hang", REAL_LIB=real_lib),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.monotonic()
        while not (out / "started").exists():
            assert child.poll() is None and time.monotonic() - t0 < 120, "the hanging build did not start"
            time.sleep(0.1)
        # a live builder: a second build waits a bounded time and names the lock file
        with pytest.raises(RuntimeError, match=r"holds the lock .*fastjac\.lock"):
            with cppb._build_lock(out, timeout=0.5):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (out / "lock").exists()  # torch's lock file, left behind by the killed build
    t0 = time.monotonic()
    r = _run_build(tmp_path, real_lib)  # before the fix this waited on the stale lock forever
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compiled" in r.stdout and time.monotonic() - t0 < 120
    assert not (out / "lock").exists()


_INFO = textwrap.dedent("""
    import torch, fastjac as fj
    with torch.no_grad():
        print(fj.info(fj.ItrSA(8, 2), torch.randn(3, 8)))
""")


def test_a_wrong_cached_library_is_refused_and_repaired(tmp_path, real_lib):
    out = tmp_path / cppb.build_key()
    out.mkdir()
    foreign = Path(torch.__file__).parent / "lib" / "libtorch_global_deps.so"
    if not foreign.is_file():
        foreign = Path(torch.__file__).parent / "lib" / "libc10.so"
    (out / f"{cppb.LIB_NAME}.so").write_bytes(foreign.read_bytes())  # loads fine, registers no fastjac op
    r = subprocess.run(
        [sys.executable, "-c", _INFO], env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "-> cpp" not in r.stdout and "not a fastjac C++ library" in r.stdout, r.stdout
    r = _run_build(tmp_path, real_lib)  # `python -m fastjac build` repairs it
    assert r.returncode == 0 and "compiled" in r.stdout, (r.stdout, r.stderr[-2000:])
    r = subprocess.run(
        [sys.executable, "-c", _INFO], env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.stdout.startswith("backend='auto' -> cpp"), (r.stdout, r.stderr[-2000:])


def test_a_tagged_library_without_the_ops_is_not_reported_ok(monkeypatch):
    monkeypatch.setattr(cppb, "OPS", cppb.OPS + ("no_such_op",))
    with pytest.raises(RuntimeError, match="does not register the ops"):
        cppb._verify()
    monkeypatch.setattr(cppb, "ABI", cppb.ABI + 1)
    monkeypatch.setattr(cppb, "OPS", cppb.OPS[:-1])
    with pytest.raises(RuntimeError, match="ABI version"):
        cppb._verify()


def test_an_unwritable_cache_folder_names_FASTJAC_CPP_CACHE(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FASTJAC_CPP_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(cppb, "_loaded", None)
    with pytest.raises(RuntimeError, match="FASTJAC_CPP_CACHE"):
        cppb.load()
    assert cppb.main([]) == 1 and "FASTJAC_CPP_CACHE" in capsys.readouterr().err


def test_auto_probes_the_toolchain_once_per_process(monkeypatch, tmp_path):
    # a compiler exists but no build is cached: "auto" declines cpp on every call, and must not re-run
    # `ninja --version` (a subprocess) or re-hash csrc/ each time
    monkeypatch.setenv("FASTJAC_CPP_CACHE", str(tmp_path))
    monkeypatch.setattr(cppb, "_loaded", None)
    cppb._forget_probe()
    spawned, hashed = [], []
    real_popen, real_key = subprocess.Popen, cppb._build_key

    class CountingPopen(real_popen):
        def __init__(self, *a, **k):
            spawned.append(a[0] if a else k.get("args"))
            super().__init__(*a, **k)

    monkeypatch.setattr(subprocess, "Popen", CountingPopen)
    monkeypatch.setattr(cppb, "_build_key", lambda: hashed.append(1) or real_key())
    m = fj.ItrSA(8, 2).requires_grad_(False)
    X, T = torch.randn(3, 8), torch.randn(3, 8)
    try:
        with torch.no_grad():
            for _ in range(20):
                fj.jvp(m, X, T)
    finally:
        cppb._forget_probe()
    assert len(spawned) <= 1 and len(hashed) <= 1, (spawned, len(hashed))


def test_setup_ships_every_source_the_build_compiles():
    # setup.py copies csrc/ into a non-editable install by an explicit list: it must match the backend's
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    shipped = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "CSRC_FILES" for t in n.targets)
    )
    assert set(shipped) == set(cppb.SOURCES + cppb.HEADERS)
