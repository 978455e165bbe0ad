"""The package's layers: no module imports a layer above its own at import time, and every module imports on its
own (no import circle). Lazy imports inside functions that reach upward are listed here, each with its reason."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "fastjac")

# lowest first; a module may import its own layer and those below it
LAYERS = [
    ("fastjac._checks", "fastjac.config", "fastjac._compat", "fastjac._io"),
    ("fastjac.ops", "fastjac.nn"),  # fastjac.nn: the forward-mode SDPA, on the ops (imports only torch and ops)
    ("fastjac.models", "fastjac.linalg"),
    ("fastjac.backends",),
    ("fastjac.linearization",),
    ("fastjac.api",),
    ("fastjac.analysis", "fastjac.plot"),
    ("fastjac.train", "fastjac.data", "fastjac.distributed"),
    ("fastjac", "fastjac.__main__", "fastjac.cli"),
]

# (importer prefix, imported prefix): function-level imports that go up a layer on purpose
LAZY_UPWARD_OK = {
    ("fastjac.ops", "fastjac.config"),  # not upward; kept for clarity
    # lyapunov_spectrum(parallel=...) hands the job to the optional distributed engine
    ("fastjac.analysis.lyapunov", "fastjac.distributed"),
    # the C++ flash ops ask the extension loader (backends/cpp.py builds and loads the library) whether they can run
    ("fastjac.ops.attention.cpp", "fastjac.backends"),
    # the CLI and docs helpers reach every subsystem
    ("fastjac.__main__", "fastjac"),
}


def _module_name(path):
    rel = os.path.relpath(path, os.path.join(ROOT, "..")).replace(os.sep, "/")[:-3]
    return rel[: -len("/__init__")].replace("/", ".") if rel.endswith("/__init__") else rel.replace("/", ".")


def _modules():
    out = []
    for d, _, files in os.walk(ROOT):
        out += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _layer(mod):
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    return None if best is None else best[0]


def _imports(path, mod):
    """(imported fastjac module, at module level?) for every import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body} | {
        id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for t in names:
            if t == "fastjac" or t.startswith("fastjac."):
                found.append((t, id(node) in top_level))
    return found


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in _modules():
        mod = _module_name(path)
        lm = _layer(mod)
        assert lm is not None, f"{mod} is in no layer of this test: add it to LAYERS"
        for target, at_top in _imports(path, mod):
            lt = _layer(target)
            if lt is None or lt <= lm:
                continue
            if not at_top and any(mod.startswith(a) and target.startswith(b) for a, b in LAZY_UPWARD_OK):
                continue
            bad.append(f"{mod} (layer {lm}) imports {target} (layer {lt}){'' if at_top else ' lazily'}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_module_imports_on_its_own():
    # one fresh interpreter; before each module every fastjac module is dropped, so a circle shows as ImportError
    mods = [_module_name(p) for p in _modules() if not _module_name(p).endswith("__main__")]
    script = (
        "import importlib, sys\n"
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'fastjac' or k.startswith('fastjac.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.join(ROOT, ".."),
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize(
    "name", ["fastjac.lyapunov", "fastjac.spectra", "fastjac.energy", "fastjac.oscillation", "fastjac.pseudo_energy"]
)
def test_old_module_paths_are_gone_in_0_3(name):
    # 0.3 removed the sys.modules aliases of the pre-0.2 paths: the analysis modules are fastjac.analysis.*
    import importlib

    with pytest.raises(ModuleNotFoundError, match=name):
        importlib.import_module(name)
    assert importlib.import_module("fastjac.analysis." + name.split(".")[-1]).__name__.startswith("fastjac.analysis.")


def test_no_import_circle_between_the_engine_the_distributed_runs_and_the_cli():
    # issue 19: the distributed package imports the engine (analysis.benettin) and fastjac._io, never
    # analysis.lyapunov or the command line; fastjac.cli reaches down only
    for path in _modules():
        mod = _module_name(path)
        targets = [t for t, _ in _imports(path, mod)]
        if mod.startswith("fastjac.distributed"):
            assert not any(
                t.startswith(("fastjac.analysis.lyapunov", "fastjac.cli", "fastjac.__main__"))
                for t in targets
                if not (mod == "fastjac.distributed" and t == "fastjac.analysis.lyapunov")
            ), (mod, targets)
        if mod.startswith("fastjac.analysis.benettin"):
            assert not any(t.startswith("fastjac.distributed") for t in targets), (mod, targets)
