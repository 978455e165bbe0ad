"""Ahead-of-time GPU check: compile every Triton launch configuration of fastjac for sm_80 and sm_90, no GPU needed.

    python -m fastjac aot                      # print the table (compiled results cached by kernel source hash)
    python -m fastjac aot --json FILE          # also write one record per compiled configuration
    python -m fastjac aot --update             # rewrite bench/results/aot_records.json and aot_table.md
    python -m fastjac aot --no-cache           # compile everything afresh

What it does:

1. Capture. The library's launchers (``attn_fwd_launch`` / ``attn_jvp_launch`` through ``msa_forward_triton`` /
   ``msa_jvp_triton``, ``norm_residual_jvp_triton``, ``step_dense_launch``, the three QR launchers) run on torch
   ``meta`` tensors with ``_launch.ARCH_OVERRIDE`` set and a stand-in Triton driver that reports the target GPU, so
   each launcher takes its GPU branch: its tiles, ``num_warps`` and ``num_stages`` from the launch table
   (``_launch.TABLE``). Each kernel's ``_do_compile`` is replaced by a recorder, so a launch records exactly what
   Triton would compile on that GPU (signature, integer / alignment specialisation, constexprs, options), and
   nothing is launched. Shapes: S in {81, 1024, 4096}, D in {256, 512}, H = 8, k in {1, 16, 64}, causal and not;
   dtypes float32 (IEEE and TF32), bfloat16, float16, float64; norms l2 / rms / layer / none (group D) and AKOrN's
   oscillator projection (group 4); the dense Jacobian at S = 81; QR with n = S * D, k in {16, 64, 128} on the
   Lyapunov layout and row-major. A few extra shapes (D = 128 and 1024, D in {16, 32} for the dense kernel,
   k = 32 for QR, D = 2048 and 8192 for the norm) reach every table entry the grid above does not: the check
   fails if any table entry is left uncompiled.
2. Compile. ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
   options)`` per configuration and architecture: ``metadata.shared`` (bytes of shared memory), then the ptxas of
   the triton wheel (``ptxas`` for sm_80, ``ptxas-blackwell`` for sm_90a, Triton's flags) with ``-v`` for registers
   and spill bytes, and ``cuobjdump -sass`` for tensor-core instructions (HMMA = mma.sync incl. TF32 and
   bfloat16 / float16, HGMMA = wgmma, DMMA = FP64 mma).
3. Verdict. ``fits`` = shared <= the architecture's opt-in limit (sm_80 166912 B, sm_90 232448 B) and
   registers x threads <= 65536 and zero spill bytes (stores + loads) and, where the dtype allows tensor cores
   (TF32, bfloat16, float16, float64 products), tensor-core instructions present. ``tensor_cores`` is null where
   no tensor core applies (IEEE float32 products, kernels without a matrix product).

Results are cached in ``bench/results/aot_records.json`` keyed by sha256(kernel source hash (sha256 of the
``@triton.jit`` function's source with its decorator; the kernels call only ``tl`` builtins), triton version, this
module's METHOD, architecture, signature, constexprs, attrs, options): a changed kernel source changes the key and
forces a compile.
What this proves: the kernels compile for sm_80 / sm_90 at every launch configuration, within the resource limits,
on tensor cores where expected. What it does not: speed, and the runtime behaviour of the compiled code.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import importlib
import itertools
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Optional

METHOD = "fastjac-aot-1"  # bump when the measurement below changes: it invalidates every cached record
TC_OPS = ("HGMMA", "HMMA", "DMMA")
KERNELS = OrderedDict(
    [  # short name -> (module, function)
        ("attn_fwd", ("fastjac.ops.attention.triton", "_attn_fwd_kernel")),
        ("attn_jvp", ("fastjac.ops.attention.triton", "_attn_jvp_fwd_kernel")),
        ("norm", ("fastjac.ops.norm.triton", "_norm_jvp_fwd_kernel")),
        ("dense", ("fastjac.ops.step.dense_triton", "_step_dense_fwd_kernel")),
        ("qr_gram", ("fastjac.ops.qr.triton", "_qr_gram_kernel")),
        ("qr_apply", ("fastjac.ops.qr.triton", "_qr_apply_kernel")),
    ]
)
S_LIST, D_LIST, K_LIST, H = (81, 1024, 4096), (256, 512), (1, 16, 64), 8
QR_K = (16, 64, 128)
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
DEFAULT_CACHE = os.path.join(REPO, "bench", "results", "aot_records.json")
DEFAULT_MD = os.path.join(REPO, "bench", "results", "aot_table.md")


# ------------------------------------------------------------------------------------------------------- capture


class _FakeDriver:
    """Just enough of a Triton driver for JITFunction.run to bind arguments for a CUDA target (device id = arch)."""

    def __init__(self):
        self.arch = 90

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _jsonable(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl.dtype": v.name}
    if isinstance(v, tl.constexpr):
        return v.value
    return v


def _from_json(v):
    import triton.language as tl

    if isinstance(v, dict) and "tl.dtype" in v:
        return tl.dtype(v["tl.dtype"])
    return v


def capture(archs=(80, 90)) -> List[dict]:
    """Drive every launcher on meta tensors for each architecture; return the recorded compile requests."""
    from triton.runtime.driver import driver

    from . import _launch, _utils

    if _utils.INTERPRET:
        raise RuntimeError("capture needs TRITON_INTERPRET unset when fastjac's kernels are imported")
    fake = _FakeDriver()
    driver.set_active(fake)
    mods = {name: importlib.import_module(m) for name, (m, _) in KERNELS.items()}
    records: List[dict] = []
    state = {"tag": None}
    used = []
    real_config = _launch.config

    def config(kernel, arch, dclass, size):  # remember which table entry the next launch uses
        b, cfg = real_config(kernel, arch, dclass, size)
        used.append((kernel, arch, dclass, b))
        return b, cfg

    _launch.config = config
    for short, (_modname, fname) in KERNELS.items():
        kern = getattr(mods[short], fname)

        def _do_compile(key, signature, device, constexprs, options, attrs, warmup, _short=short, _k=kern):
            names = _k.arg_names
            records.append(
                dict(
                    short=_short,
                    kernel=f"{_k.fn.__module__}.{_k.fn.__name__}",
                    arch=int(device),
                    signature=dict(signature),
                    constexprs={names[p[0]]: _jsonable(v) for p, v in constexprs.items()},
                    attrs=[[list(p), v] for p, v in attrs.items()],
                    num_warps=options.num_warps,
                    num_stages=options.num_stages,
                    entry=list(used[-1]) if used else None,
                    tag=dict(state["tag"]),
                )
            )
            return None

        kern._do_compile = _do_compile
    try:
        for arch in archs:
            fake.arch = arch
            _launch.ARCH_OVERRIDE = arch
            _drive(state, used)
    finally:
        _launch.ARCH_OVERRIDE = None
        _launch.config = real_config
    return records


def _drive(state, used):
    import torch

    from .. import config as fj_config
    from .attention.ref import AttnParams
    from .attention.triton import msa_forward_triton, msa_jvp_triton
    from .norm.ref import NormCache, NormParams
    from .norm.triton import norm_residual_jvp_triton
    from .qr.triton import MAX_K, qr_apply_launch, qr_gram_launch
    from .step.dense_triton import step_dense_launch

    meta = dict(device="meta")
    dts = (
        ("fp32", torch.float32, "ieee"),
        ("tf32", torch.float32, "tf32"),
        ("bf16", torch.bfloat16, "ieee"),
        ("fp16", torch.float16, "ieee"),
        ("fp64", torch.float64, "ieee"),
    )
    # ---- attention: the grid, plus D = 128 (dh = 16) and D = 1024 (dh = 128) for the other table buckets
    shapes = [(S, D) for S in S_LIST for D in D_LIST] + [(81, 128), (1024, 1024)]
    for (S, D), (dn, dt, prec), causal in itertools.product(shapes, dts, (False, True)):
        dh = D // H
        p = AttnParams(
            *(torch.empty(H, D, dh, dtype=dt, **meta) for _ in range(3)), None, None, None, None, None, dh**-0.5, causal
        )
        X = torch.empty(1, S, D, dtype=dt, **meta)
        with fj_config.settings(matmul_precision=prec):
            state["tag"] = dict(path="attention", S=S, D=D, dtype=dn, causal=causal)
            _, q, k, v, _ = msa_forward_triton(X, p)
            for K in K_LIST:
                state["tag"]["k"] = K
                msa_jvp_triton(p, q, k, v, torch.empty(K, 1, S, D, dtype=dt, **meta))
    # ---- fused residual + norm JVP: ItrSA norms (group D) and AKOrN's sphere projection (group 4)
    for D, (dn, dt, _), K in itertools.product(D_LIST + (2048, 8192), dts, K_LIST):
        if dn == "tf32" or (dn == "fp64" and D > 4096):
            continue  # no matrix product in this kernel; no float64 entry for rows wider than 4096
        S = 81 if D > 512 else None
        for S_ in (S,) if S else S_LIST:
            for kind, group, gamma in (
                ("l2", D, True),
                ("rms", D, True),
                ("layer", D, True),
                ("none", D, False),
                ("l2", 4, False),
            ):
                G = D // group
                c = NormCache(
                    NormParams(kind, torch.empty(D, dtype=dt, **meta) if gamma else None, None, 1e-6, group),
                    torch.empty(1, S_, G, group, dtype=dt, **meta),
                    torch.empty(1, S_, G, 1, dtype=dt, **meta),
                    torch.empty(1, S_, D, dtype=dt, **meta),
                )
                state["tag"] = dict(path="norm", kind=kind, group=group, S=S_, D=D, dtype=dn, k=K)
                T = torch.empty(K, 1, S_, D, dtype=dt, **meta)
                norm_residual_jvp_triton(c, T, torch.empty_like(T), 1.0)
    # ---- dense step Jacobian at S = 81 (D = 16, 32 for the other feature-tile buckets); row chunks of the
    #      library's own chunking (dense_triton.step_dense_triton), R1 expanded (L = I) or per token
    from .step import dense_triton as dn_mod

    for D, (dn, dt, _) in itertools.product(D_LIST + (16, 32), dts):
        if dn == "tf32":
            continue
        S = 81
        es = torch.empty((), dtype=dt).element_size()
        per_row = (4 * H * S * D + 3 * H * D * D + 3 * D * D) * es
        chunk = max(1, min(S, dn_mod.DENSE_FACTOR_BYTES // per_row))
        out = torch.empty(S * D, S * D, dtype=dt, **meta)
        A = torch.empty(H, S, S, dtype=dt, **meta)
        rb = torch.empty(S, H, D, dtype=dt, **meta)
        for i0 in range(0, S, chunk):
            i1 = min(S, i0 + chunk)
            I = i1 - i0
            U = torch.empty(H, I, S, D, dtype=dt, **meta)
            Ed = torch.empty(I, D, D, dtype=dt, **meta)
            for r1 in (
                torch.empty(H, D, D, dtype=dt, **meta).unsqueeze(0).expand(I, H, D, D),
                torch.empty(I, H, D, D, dtype=dt, **meta),
            ):
                state["tag"] = dict(path="dense", S=S, D=D, dtype=dn, rows=f"{i0}:{i1}")
                step_dense_launch(A, r1, U, rb, Ed, out, i0, i1)
    # ---- CholeskyQR2 primitives: n = S * D, the Lyapunov layout (V [k, B, n] viewed as [B, n, k]) and row-major
    for S, D, K, (dn, dt) in itertools.product(
        S_LIST, D_LIST, QR_K + (32,), (("fp32", torch.float32), ("fp64", torch.float64))
    ):
        if K > MAX_K or (K == 32 and (S, D) != (81, 256)):
            continue
        n = S * D
        for layout in ("lyapunov", "rowmajor"):
            if layout == "lyapunov":
                M = torch.empty(K, 1, n, dtype=dt, **meta).permute(1, 2, 0)
                out = torch.empty(K, 1, n, dtype=dt, **meta).permute(1, 2, 0)
            else:
                M, out = torch.empty(1, n, K, dtype=dt, **meta), torch.empty(1, n, K, dtype=dt, **meta)
            W = torch.empty(1, K, K, dtype=dt, **meta)
            state["tag"] = dict(path="qr", S=S, D=D, n=n, k=K, dtype=dn, layout=layout)
            qr_gram_launch(M)
            qr_gram_launch(M, W)
            qr_apply_launch(M, W, out)


def config_key(r: dict) -> str:
    """The identity of one compile: kernel, architecture, signature, constexprs, attrs, options."""
    return json.dumps(
        [r["kernel"], r["arch"], r["signature"], r["constexprs"], r["attrs"], r["num_warps"], r["num_stages"]],
        sort_keys=True,
    )


def source_hashes() -> Dict[str, str]:
    """kernel qualified name -> sha256 of the @triton.jit function's source, decorator line included (the kernels
    call only ``tl`` builtins, so their source is all of their code); the same under the interpreter and compiled."""
    import inspect

    out = {}
    for m, f in KERNELS.values():
        fn = getattr(importlib.import_module(m), f).fn
        out[f"{m}.{f}"] = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    return out


def cache_hash(r: dict, src: Dict[str, str]) -> str:
    import triton

    blob = json.dumps([METHOD, triton.__version__, src[r["kernel"]], config_key(r)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def distinct(records: List[dict]) -> "OrderedDict[str, dict]":
    """Distinct compile configurations, each with the list of table entries and problem shapes that reach it."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for r in records:
        k = config_key(r)
        if k not in out:
            out[k] = dict(
                {
                    f: r[f]
                    for f in ("short", "kernel", "arch", "signature", "constexprs", "attrs", "num_warps", "num_stages")
                },
                entries=[],
                uses=[],
            )
        d = out[k]
        if r["entry"] and r["entry"] not in d["entries"]:
            d["entries"].append(r["entry"])
        if r["tag"] not in d["uses"]:
            d["uses"].append(r["tag"])
    return out


# ------------------------------------------------------------------------------------------------------- compile


def _bin() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_v(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from the ptxas of the triton wheel, run as Triton runs it (plus -v)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    exe = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [
                exe,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                src,
                "-o",
                out,
            ],
            capture_output=True,
            text=True,
        )
        if log.returncode != 0:
            raise RuntimeError(f"ptxas failed: {log.stderr[-500:]}")
    text = log.stderr + log.stdout
    g = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return dict(
        registers=g(r"Used (\d+) registers"),
        spill_stores=g(r"(\d+) bytes spill stores"),
        spill_loads=g(r"(\d+) bytes spill loads"),
        stack=g(r"(\d+) bytes stack frame"),
        ptxas=os.path.basename(exe),
    )


def _sass_tc(cubin: bytes) -> List[str]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([os.path.join(_bin(), "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    return sorted({m for m in re.findall(r"\b(" + "|".join(TC_OPS) + r")\b", sass)})


def tensor_cores_expected(r: dict) -> Optional[bool]:
    """True where the configuration's matrix products may run on tensor cores (TF32, bfloat16, float16, float64
    operands), None where none applies (IEEE float32 products, or no tl.dot in the kernel)."""
    short, c, sig = r["short"], r["constexprs"], r["signature"]
    if short in ("attn_fwd", "attn_jvp"):
        if c.get("F64"):
            return True
        if sig["q_ptr"] in ("*bf16", "*fp16"):
            return True
        return True if c.get("PREC") == "tf32" else None
    if short in ("qr_gram", "qr_apply"):  # products are input_precision="ieee" (TF32 would spoil the Gram matrix)
        return True if sig["M"] == "*fp64" else None
    return None


def compile_one(r: dict) -> dict:
    """Compile one configuration for its architecture and measure it. Returns the measurement fields."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _launch

    t0 = time.time()
    m, f = r["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(m), f)
    src = ASTSource(
        fn,
        dict(r["signature"]),
        {k: _from_json(v) for k, v in r["constexprs"].items()},
        {tuple(p): v for p, v in r["attrs"]},
    )
    res = dict(shared_limit=_launch.SHARED_LIMIT[r["arch"]])
    try:
        k = triton.compile(
            src,
            target=GPUTarget("cuda", r["arch"], 32),
            options=dict(num_warps=r["num_warps"], num_stages=r["num_stages"]),
        )
        res.update(_ptxas_v(k.asm["ptx"], r["arch"]))
        res["shared"] = int(k.metadata.shared)
        res["tc_ops"] = _sass_tc(k.asm["cubin"])
        ptx = k.asm["ptx"]
        res["ptx_mma"] = dict(wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)))
        res["error"] = None
    except Exception as e:  # a compile failure is a result (it does not fit)
        res.update(
            shared=None,
            registers=None,
            spill_stores=None,
            spill_loads=None,
            tc_ops=[],
            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}",
        )
    res["compile_s"] = round(time.time() - t0, 2)
    return res


def verdict(r: dict) -> dict:
    """The derived fields: spill_bytes, tensor_cores, fits (and why not)."""
    from . import _launch

    out = {}
    why = []
    if r.get("error"):
        why.append("compile error: " + r["error"])
        out.update(spill_bytes=None, tensor_cores=None)
    else:
        out["spill_bytes"] = r["spill_stores"] + r["spill_loads"]
        exp = tensor_cores_expected(r)
        out["tensor_cores"] = None if exp is None else bool(r["tc_ops"])
        if r["shared"] > _launch.SHARED_LIMIT[r["arch"]]:
            why.append(f"shared {r['shared']} B > {_launch.SHARED_LIMIT[r['arch']]} B")
        if r["registers"] * 32 * r["num_warps"] > _launch.REGS_PER_SM or r["registers"] > _launch.MAX_REGS_PER_THREAD:
            why.append(f"{r['registers']} registers x {32 * r['num_warps']} threads > {_launch.REGS_PER_SM}")
        if out["spill_bytes"]:
            why.append(f"spills {r['spill_stores']}/{r['spill_loads']} B (stores/loads)")
        if out["tensor_cores"] is False:
            why.append("no tensor-core instruction for a TF32/bf16/fp16/fp64 product")
    out["fits"] = not why
    out["why_not"] = "; ".join(why) or None
    return out


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastjac_aot_triton_cache"))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)


def run_check(
    cache_path: Optional[str] = DEFAULT_CACHE, jobs: int = 2, archs=(80, 90), log=print, recheck: int = 0
) -> dict:
    """Capture, compile what the cache lacks, and judge. Returns dict(records, missing_entries, compiled, ...).

    ``recheck`` > 0 also recompiles that many cached records (the cheapest) and reports any that differ."""
    from . import _launch

    t0 = time.time()
    recs = capture(archs)
    cfgs = distinct(recs)
    src = source_hashes()
    cache = load_cache(cache_path) if cache_path else {}
    todo, out = [], []
    for c in cfgs.values():
        c["key"] = cache_hash(c, src)
        hit = cache.get(c["key"])
        if hit is not None:
            c.update({f: hit[f] for f in MEASURED if f in hit}, cached=True)
        else:
            todo.append(c)
        out.append(c)
    log(
        f"captured {len(recs)} launches -> {len(cfgs)} distinct configurations ({len(cfgs) - len(todo)} cached, "
        f"{len(todo)} to compile) in {time.time() - t0:.1f} s"
    )
    rech = sorted([c for c in out if c.get("cached")], key=lambda c: c.get("compile_s", 9e9))[:recheck]
    jobs_list = todo + rech
    mismatch = []
    if jobs_list:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max(1, jobs), mp_context=ctx, initializer=_worker_init) as pool:
            futs = {
                pool.submit(
                    compile_one,
                    {
                        f: c[f]
                        for f in (
                            "short",
                            "kernel",
                            "arch",
                            "signature",
                            "constexprs",
                            "attrs",
                            "num_warps",
                            "num_stages",
                        )
                    },
                ): i
                for i, c in enumerate(jobs_list)
            }
            for n, fu in enumerate(cf.as_completed(futs), 1):
                c = jobs_list[futs[fu]]
                res = fu.result()
                if c.get("cached"):
                    diff = {
                        f: (c.get(f), res.get(f))
                        for f in ("shared", "registers", "spill_stores", "spill_loads", "tc_ops")
                        if c.get(f) != res.get(f)
                    }
                    if diff:
                        mismatch.append(dict(key=c["key"], kernel=c["kernel"], arch=c["arch"], diff=diff))
                else:
                    c.update(res, cached=False)
                if n % 20 == 0 or n == len(jobs_list):
                    log(f"  compiled {n}/{len(jobs_list)} ({time.time() - t0:.0f} s)")
    for c in out:
        c.update(verdict(c))
    reached = {tuple(e) for c in out for e in c["entries"]}
    missing = sorted(set(k for k in _launch.TABLE if k[1] in archs) - reached)
    return dict(
        records=out,
        missing_entries=missing,
        compiled=len(todo),
        rechecked=len(rech),
        recheck_mismatch=mismatch,
        seconds=time.time() - t0,
    )


def load_cache(path: str, flag: str = "--cache") -> Dict[str, dict]:
    """The cached compile results of ``path`` by key ({} when the file does not exist yet), or a ValueError naming
    ``flag`` when it is a folder or not a cache this module wrote (corrupt JSON, a list, records without keys)."""
    if not os.path.exists(path):
        return {}
    fix = "delete it, pass another --cache, or --no-cache"
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a folder, not a cache file; {fix}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{flag}: {path!r} is not readable JSON ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    recs = data.get("records") if isinstance(data, dict) else None
    if not isinstance(recs, list) or not all(isinstance(c, dict) and isinstance(c.get("key"), str) for c in recs):
        raise ValueError(
            f"{flag}: {path!r} is not a fastjac aot cache (expected an object with a list of "
            f"records that have keys, got a {type(data).__name__}); {fix}"
        )
    return {c["key"]: c for c in recs}


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {v}")
        return v

    return parse


MEASURED = (
    "shared",
    "shared_limit",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack",
    "ptxas",
    "tc_ops",
    "ptx_mma",
    "error",
    "compile_s",
)


def public_record(c: dict) -> dict:
    """One record of ``--json``: the fields named in the issue, then the raw measurements and what uses it."""
    keep = (
        "kernel",
        "arch",
        "signature",
        "constexprs",
        "attrs",
        "num_warps",
        "num_stages",
        "shared",
        "registers",
        "spill_bytes",
        "tensor_cores",
        "fits",
        "why_not",
        "shared_limit",
        "spill_stores",
        "spill_loads",
        "stack",
        "tc_ops",
        "ptx_mma",
        "ptxas",
        "error",
        "compile_s",
        "entries",
        "uses",
        "key",
    )
    out = {f: c.get(f) for f in keep}
    out["n_uses"] = len(c.get("uses") or [])
    out["uses"] = (c.get("uses") or [])[:3]  # a sample of the problem shapes that reach it (n_uses in all)
    return out


# ------------------------------------------------------------------------------------------------------- report


def describe(c: dict) -> str:
    cx = c["constexprs"]
    short = c["short"]
    dt = next((t[1:] for n, t in c["signature"].items() if t.startswith("*")), "?")
    ws = f"w{c['num_warps']} s{c['num_stages']}"
    if short.startswith("attn"):
        dc = "fp64" if cx.get("F64") else (dt if dt != "fp32" else ("tf32" if cx.get("PREC") == "tf32" else "fp32"))
        split = f" DSPLIT={cx['DSPLIT']}" if cx.get("DSPLIT", 1) != 1 else ""
        return (
            f"{short} {dc}{' causal' if cx.get('CAUSAL') else ''} BM={cx['BM']} BN={cx['BN']} BDH={cx['BDH']} "
            f"BV={cx['BV']}{split} {ws}"
        )
    if short == "norm":
        kind = {0: "none", 1: "l2", 2: "rms", 3: "layer"}[cx["KIND"]]
        return (
            f"norm {kind}{' gamma' if cx.get('HAS_GAMMA') else ''} {dt} BR={cx['BR']} BG={cx['BG']} BN={cx['BN']} {ws}"
        )
    if short == "dense":
        return f"dense {dt} BR={cx['BR']} BM={cx['BM']} BB={cx['BB']} {ws}"
    if short == "qr_gram":
        return f"qr_gram{' APPLY' if cx.get('APPLY') else ''} {dt} BLOCK_N={cx['BLOCK_N']} BLOCK_K={cx['BLOCK_K']} {ws}"
    return f"qr_apply {dt} BLOCK_N={cx['BLOCK_N']} BLOCK_K={cx['BLOCK_K']} {ws}"


def spec(c: dict) -> str:
    """The shape-dependent part of the compile key: int args not divisible by 16, and args specialised to 1."""
    names = list(c["signature"])
    div = {names[p[0]] for p, _ in c["attrs"]}
    m, f = c["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(m), f)
    unspec = {i if isinstance(i, str) else names[i] for i in getattr(fn, "do_not_specialize", ())}  # never specialised
    nod = [n for n, t in c["signature"].items() if t in ("i32", "i64") and n not in div and n not in unspec]
    ones = [
        n
        for n, t in c["signature"].items()
        if t == "constexpr" and n in c["constexprs"] and n[0].islower() and not n.isupper()
    ]
    s = []
    if nod:
        s.append("not%16: " + ",".join(nod))
    if ones:
        s.append("==1: " + ",".join(ones))
    return "; ".join(s)


def table_md(result: dict, archs=(80, 90)) -> str:
    import triton

    from . import _launch

    recs = result["records"]
    by = OrderedDict()
    for c in sorted(recs, key=lambda c: (list(KERNELS).index(c["short"]), describe(c), spec(c), c["arch"])):
        by.setdefault((describe(c), spec(c)), {})[c["arch"]] = c
    nfit = sum(c["fits"] for c in recs)
    L = [
        "# AOT check of fastjac's Triton kernels: sm_80 (A100) and sm_90 (H100)\n",
        f"`python -m fastjac aot` (fastjac/ops/_aot.py), triton {triton.__version__}, no GPU: "
        f"`triton.compile` for GPUTarget('cuda', 80 / 90), ptxas of the triton wheel with `-v`, `cuobjdump -sass`. "
        f"Limits: shared memory per block sm_80 {_launch.SHARED_LIMIT[80]} B, sm_90 {_launch.SHARED_LIMIT[90]} B; "
        f"{_launch.REGS_PER_SM} registers per block, 255 per thread.\n",
        f"**{len(recs)} compiled configurations ({len(by)} distinct per architecture pair), {nfit} fit, "
        f"{len(recs) - nfit} do not.** Table entries never reached: {len(result['missing_entries'])}.\n",
        "Columns per architecture: shared bytes, registers per thread, spill bytes (stores + loads), tensor-core "
        "SASS (HMMA = mma.sync, HGMMA = wgmma, DMMA = FP64 mma; `-` where no tensor core applies: IEEE float32 "
        "products, kernels without a matrix product), verdict. `spec` = the shape-dependent part of the compile "
        "key (int args not divisible by 16; the shape ints S, H, row counts, n are never specialised). Speed is not "
        "measured here.\n",
    ]
    hdr = "| configuration | spec | " + " | ".join(f"sm_{a} shared | regs | spill | TC | fits" for a in archs) + " |"
    L += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for (d, s), per in by.items():
        cells = []
        for a in archs:
            c = per.get(a)
            if c is None:
                cells += ["", "", "", "", ""]
                continue
            if c.get("error"):
                cells += ["error", "", "", "", "NO"]
                continue
            tc = "-" if c["tensor_cores"] is None else (",".join(c["tc_ops"]) or "NONE")
            cells += [
                str(c["shared"]),
                str(c["registers"]),
                str(c["spill_bytes"]),
                tc,
                "yes" if c["fits"] else "NO: " + c["why_not"],
            ]
        L.append(f"| {d} | {s} | " + " | ".join(cells) + " |")
    bad = [c for c in recs if not c["fits"]]
    if bad:
        L.append("\n## Not fitting\n")
        L += [f"- sm_{c['arch']} {describe(c)} ({spec(c)}): {c['why_not']}" for c in bad]
    if result["missing_entries"]:
        L.append("\n## Table entries no launch reached\n")
        L += [f"- {e}" for e in result["missing_entries"]]
    return "\n".join(L) + "\n"


def summary(result: dict) -> str:
    recs = result["records"]
    nfit = sum(c["fits"] for c in recs)
    tc = [c for c in recs if c["tensor_cores"] is not None]
    return (
        f"{len(recs)} configurations compiled for sm_80/sm_90: {nfit} fit, {len(recs) - nfit} do not; "
        f"{sum(c['tensor_cores'] for c in tc)}/{len(tc)} with a TF32/bf16/fp16/fp64 product on tensor cores; "
        f"max shared {max(c['shared'] or 0 for c in recs)} B, max registers "
        f"{max(c['registers'] or 0 for c in recs)}, total spill bytes "
        f"{sum(c['spill_bytes'] or 0 for c in recs)}; table entries not reached: "
        f"{len(result['missing_entries'])}; {result['compiled']} compiled now, rest from the cache "
        f"({result['seconds']:.0f} s)"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastjac aot",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--json", default=None, help="write one record per compiled configuration to this file")
    ap.add_argument("--md", default=None, help="write the markdown table to this file")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="cache of compiled results (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="compile every configuration afresh")
    ap.add_argument("--update", action="store_true", help="rewrite the cache file and bench/results/aot_table.md")
    ap.add_argument("--recheck", type=_int_at_least(0), default=0, help="also recompile N cached records and compare")
    ap.add_argument("--jobs", type=_int_at_least(1), default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    ap.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = ap.parse_args(argv)
    # every file the run reads or writes is checked before the run (it takes minutes; a late failure loses it)
    from .._io import check_out_file

    try:
        if not args.no_cache:
            load_cache(args.cache)
        for flag, path in (
            ("--json", args.json),
            ("--md", args.md),
            ("--cache", args.cache if args.update else None),
            ("--update", DEFAULT_MD if args.update else None),
        ):
            if path:
                check_out_file(path, flag)
    except ValueError as e:
        print(f"fastjac aot: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    from . import _utils

    if _utils.INTERPRET:  # kernels already decorated for the interpreter: redo this in a clean process
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        return subprocess.call(
            [sys.executable, "-m", "fastjac.ops._aot"] + list(argv if argv is not None else sys.argv[1:]), env=env
        )
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    res = run_check(None if args.no_cache else args.cache, args.jobs, tuple(args.arch), log, args.recheck)
    md = table_md(res, tuple(args.arch))
    if not args.quiet:
        print(md)
    print(summary(res))
    if res["recheck_mismatch"]:
        print(f"RECHECK MISMATCH (cached result differs from a fresh compile): {res['recheck_mismatch']}")
    recs = [public_record(c) for c in res["records"]]
    from .._io import write_with_fallback

    def text_writer(text):
        def write(tmp):
            with open(tmp, "w") as fh:
                fh.write(text)

        return write

    outputs = []  # written atomically; a late failure falls back to the temp folder (the run is not lost)
    if args.json:
        outputs.append((args.json, json.dumps(recs, indent=1), "aot_records"))
    if args.md:
        outputs.append((args.md, md, "aot_table"))
    if args.update:
        import triton

        outputs.append(
            (
                args.cache,
                json.dumps(dict(method=METHOD, triton=triton.__version__, records=recs), indent=0),
                "aot_cache",
            )
        )
        outputs.append((DEFAULT_MD, md, "aot_table"))
    lost = [path for path, text, what in outputs if write_with_fallback(path, text_writer(text), what) is None]
    if lost:
        print(f"fastjac aot: could not write {lost} nor their fallbacks", file=sys.stderr)
        return 2
    ok = all(c["fits"] for c in res["records"]) and not res["missing_entries"] and not res["recheck_mismatch"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
