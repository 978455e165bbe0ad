"""The ahead-of-time GPU check (fastjac/ops/_aot.py): every launch configuration fits sm_80 and sm_90.

``test_every_launch_configuration_fits`` runs ``python -m fastjac.ops._aot`` in a clean subprocess (the kernels must
be decorated for compilation, not for the interpreter that tests/conftest.py switches on). Compiled results come from
bench/results/aot_records.json, keyed by the kernel's source hash (sha256 of the @triton.jit function's source), the
triton version, the architecture and the full compile key: a configuration whose kernel source changed is compiled again
here (a few seconds each), never taken from a stale record. Two cached records are also recompiled every run and
must reproduce their cached shared memory, registers, spills and tensor-core ops exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from fastjac.ops import _aot, _launch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = (
    "kernel",
    "arch",
    "signature",
    "constexprs",
    "num_warps",
    "num_stages",
    "shared",
    "registers",
    "spill_bytes",
    "tensor_cores",
    "fits",
)


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "fastjac.ops._aot", "--json", str(out), "--quiet", "--recheck", "2", "--jobs", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    records = json.loads(out.read_text()) if out.exists() else None
    return proc, records


def test_every_launch_configuration_fits(aot):
    proc, records = aot
    print(proc.stdout[-3000:])
    assert records, f"no records written (rc {proc.returncode}): {proc.stderr[-3000:]}"
    bad = [
        (r["arch"], r["kernel"].rsplit(".", 1)[1], r["constexprs"], r["num_warps"], r["num_stages"], r["why_not"])
        for r in records
        if not r["fits"]
    ]
    assert not bad, f"{len(bad)} configurations do not fit: {bad[:10]}"
    assert "RECHECK MISMATCH" not in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in records:
        assert all(f in r for f in FIELDS)
        assert r["arch"] in (80, 90) and r["kernel"].startswith("fastjac.ops.") and r["spill_bytes"] == 0
        assert r["shared"] <= _launch.SHARED_LIMIT[r["arch"]] and r["registers"] * 32 * r["num_warps"] <= 65536
        exp = _aot.tensor_cores_expected(dict(r, short=_short(r)))
        assert r["tensor_cores"] is (None if exp is None else True), r


def _short(r):
    return {f"{m}.{f}": s for s, (m, f) in _aot.KERNELS.items()}[r["kernel"]]


def test_every_table_entry_is_compiled_for_both_archs(aot):
    _, records = aot
    reached = {tuple(e) for r in records for e in r["entries"]}
    assert set(_launch.TABLE) <= reached, sorted(set(_launch.TABLE) - reached)[:10]
    kinds = {(_short(r), r["arch"]) for r in records}
    assert kinds == {(s, a) for s in _aot.KERNELS for a in (80, 90)}


def test_launchers_use_exactly_their_table_entry(aot):
    # every captured launch compiled the tiles, num_warps and num_stages of the entry its launcher looked up
    _, records = aot
    for r in records:
        for e in r["entries"]:
            cfg = _launch.TABLE[tuple(e)]
            assert (r["num_warps"], r["num_stages"]) == (cfg.num_warps, cfg.num_stages), (r["kernel"], e)
            for name, val in cfg.tiles:
                if name == "elems":  # norm: BR * BG * BN = elems, or BR = 1 for a wider row
                    c = r["constexprs"]
                    assert c["BR"] == max(1, val // (c["BG"] * c["BN"])), (e, c)
                else:
                    assert r["constexprs"][name] == val, (r["kernel"], e, name)
            if _short(r) == "attn_jvp" and "DSPLIT" not in dict(cfg.tiles):
                assert r["constexprs"]["DSPLIT"] == 1


def test_tensor_core_products_are_on_tensor_cores(aot):
    _, records = aot
    tc = [r for r in records if r["tensor_cores"] is not None]
    kinds = {(_short(r), r["signature"].get("q_ptr", r["signature"].get("M")), r["constexprs"].get("PREC")) for r in tc}
    assert ("attn_jvp", "*fp32", "tf32") in kinds and ("attn_jvp", "*bf16", "ieee") in kinds
    assert ("attn_fwd", "*fp16", "ieee") in kinds and ("qr_gram", "*fp64", None) in kinds
    assert all(r["tensor_cores"] for r in tc)
    hopper = [r for r in tc if r["arch"] == 90]
    assert hopper and all(set(r["tc_ops"]) & {"HGMMA", "HMMA", "DMMA"} for r in hopper)


# ------------------------------------------------------------------ the check itself can fail, and cannot go stale


def _measured(**kw):
    r = dict(
        short="attn_jvp",
        arch=80,
        signature={"q_ptr": "*bf16"},
        constexprs={"PREC": "ieee", "F64": False},
        num_warps=4,
        num_stages=2,
        shared=1024,
        registers=128,
        spill_stores=0,
        spill_loads=0,
        tc_ops=["HMMA"],
        error=None,
    )
    r.update(kw)
    return r


def test_verdict_rejects_what_a_gpu_would_reject():
    assert _aot.verdict(_measured())["fits"]
    assert not _aot.verdict(_measured(shared=_launch.SHARED_LIMIT[80] + 1))["fits"]
    assert _aot.verdict(_measured(arch=90, shared=_launch.SHARED_LIMIT[80] + 1))["fits"]
    assert not _aot.verdict(_measured(spill_stores=4))["fits"]
    assert not _aot.verdict(_measured(registers=200, num_warps=16))["fits"]
    assert not _aot.verdict(_measured(tc_ops=[]))["fits"]
    assert _aot.verdict(_measured(tc_ops=[], signature={"q_ptr": "*fp32"}))["tensor_cores"] is None
    assert not _aot.verdict(_measured(error="OutOfResources: shared memory"))["fits"]


def test_cache_key_changes_with_the_kernel_source_and_toolchain():
    r = dict(
        kernel="fastjac.ops.attention.triton._attn_jvp_fwd_kernel",
        arch=90,
        signature={"q_ptr": "*fp32"},
        constexprs={"BM": 64},
        attrs=[],
        num_warps=4,
        num_stages=2,
    )
    src = {r["kernel"]: "hash-a"}
    k = _aot.cache_hash(r, src)
    assert _aot.cache_hash(r, {r["kernel"]: "hash-b"}) != k
    assert _aot.cache_hash(dict(r, num_stages=3), src) != k and _aot.cache_hash(dict(r, arch=80), src) != k
    assert _aot.source_hashes()[r["kernel"]]  # sha256 of the real kernel's source


def test_committed_cache_matches_the_committed_kernels():
    # the committed table is the current kernels' (the CI test would still recompile a stale record: this says so)
    with open(_aot.DEFAULT_CACHE) as fh:
        cached = json.load(fh)["records"]
    src = _aot.source_hashes()
    stale = [c["kernel"] for c in cached if _aot.cache_hash(c, src) != c["key"]]
    assert not stale, (
        f"bench/results/aot_records.json is stale for {sorted(set(stale))}: python -m fastjac aot --update"
    )


def test_cli_dispatch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastjac.ops._aot", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--json" in proc.stdout
