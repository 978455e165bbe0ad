"""fastjac.distributed under torch.distributed (gloo, loopback only): sample- and token-parallel Lyapunov spectra
against the single-process result in float64, uneven shards, a rank with no samples, k above a shard's local rows,
the TSQR fallback, and kill-one-rank-then-resume.

The test spawns its ranks as subprocesses of this file (``python test_distributed.py worker ...``) with
MASTER_ADDR=127.0.0.1 and a free port; every launch runs several cases and has a timeout. Each rank writes its
results to a file; the test compares them with single-process runs computed here (no process group in pytest).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
F64 = torch.float64
TOL = 1e-10
LAUNCH_TIMEOUT = 150


# ------------------------------------------------------------------------------------------------ the cases


def _model(name):
    import fastjac as fj

    torch.manual_seed(17)
    if name == "itrsa":
        return fj.ItrSA(8, 2, bias=True, dtype=F64)
    if name == "itrsa_causal":
        return fj.ItrSA(8, 2, causal=True, norm="rms", dtype=F64)
    if name == "akorn_causal":
        return fj.AKOrN(8, 2, osc_dim=4, causal=True, dtype=F64)
    if name == "small":  # D = 4: a few tokens give fewer local rows than k
        return fj.ItrSA(4, 2, norm="rms", out_proj=False, dtype=F64)
    if name == "slow":
        return SlowItrSA(8, 2, bias=True, dtype=F64)  # the weights of "itrsa"
    if name == "eta2":  # eta = 2: the non-trivial spectrum spreads over ~1 nat, so 20 steps without QR collapse it
        return fj.ItrSA(8, 2, bias=True, eta=2.0, dtype=F64)
    if name == "subclass":  # overrides forward: its Jacobian is not ItrSA's
        return ShiftedItrSA(8, 2, bias=True, dtype=F64)
    raise KeyError(name)


def _inputs(model, shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    X0 = torch.randn(*shape, generator=g, dtype=F64)
    C = torch.randn(*shape, generator=g, dtype=F64)
    if hasattr(model, "project"):
        X0 = model.project(X0)
    return X0, C


# name: (model, shape of X0, lyapunov kwargs, parallel mode)
CASES = {
    "samples_uneven": ("itrsa", (3, 5, 8), dict(k=6, steps=10, burn_in=2, seed=3), "samples"),
    "samples_zero_rank": ("itrsa", (1, 5, 8), dict(k=5, steps=6, burn_in=1), "samples"),
    "tokens_uneven": ("itrsa", (2, 7, 8), dict(k=10, steps=12, burn_in=2, seed=1), "tokens"),
    "tokens_akorn_causal": ("akorn_causal", (5, 8), dict(k=6, steps=10, burn_in=1, project_radial=True), "tokens"),
    "tokens_k_gt_rows": ("small", (3, 4), dict(k=9, steps=10, burn_in=1), "tokens"),
    "tokens_householder": ("itrsa_causal", (6, 8), dict(k=7, steps=8, burn_in=1, qr_backend="householder"), "tokens"),
    "kill_ref": ("itrsa", (9, 8), dict(k=6, steps=24, burn_in=2, seed=2), "tokens"),
    # issue 19.1: renorm_every=20 collapses the tangents; the single-process run redoes with 10, so must these
    "samples_collapse": ("eta2", (3, 5, 8), dict(k=35, steps=40, burn_in=2, renorm_every=20), "samples"),
    "tokens_collapse": ("eta2", (5, 8), dict(k=35, steps=40, burn_in=2, renorm_every=20), "tokens"),
    # issue 19.2: a subclass overriding forward runs on autograd (sample-parallel) like the single-process run
    "samples_subclass": ("subclass", (2, 5, 8), dict(k=6, steps=8, burn_in=1), "samples"),
}
CASES4 = {
    "samples_uneven": CASES["samples_uneven"],  # B = 3 on 4 ranks: rank 3 holds no sample
    "tokens_k_gt_rows4": ("small", (6, 4), dict(k=10, steps=6, burn_in=1), "tokens"),  # 4 or 8 rows per rank
    "tokens_causal4": ("itrsa_causal", (7, 8), dict(k=5, steps=6, burn_in=1), "tokens"),
    "samples_collapse4": CASES["samples_collapse"],
    "tokens_collapse4": CASES["tokens_collapse"],
}
# issue 19.2: parallel="tokens" must refuse an ItrSA subclass that overrides forward (never use ItrSA's Jacobian)
REFUSED = {"tokens_subclass": ("subclass", (5, 8), dict(k=4, steps=3, burn_in=1), "tokens")}


def _single(case):
    import fastjac as fj

    name, shape, kw, _ = case
    m = _model(name)
    X0, C = _inputs(m, shape)
    return fj.lyapunov_spectrum(m, X0, C=C, progress=False, **kw)


try:
    import fastjac as _fj

    class SlowItrSA(_fj.ItrSA):
        """An ItrSA whose every linearisation waits 30 ms, so that a run can be killed in its middle."""

        def step_params(self):
            time.sleep(0.03)
            return super().step_params()

    class ShiftedItrSA(_fj.ItrSA):
        """An ItrSA whose forward adds a tanh of the state: ItrSA's analytic Jacobian is wrong for it."""

        def forward(self, X, C=None):
            return super().forward(X, C) + 0.3 * torch.tanh(X)

    # SlowItrSA keeps ItrSA's maths (it only waits): under the exact-class rule it says so by registering
    from fastjac.distributed import register_token_linearizer as _reg

    _reg(SlowItrSA, _fj.distributed.tokens.itrsa_token_linearization)
except Exception:  # pragma: no cover - fastjac not importable: the tests fail elsewhere
    SlowItrSA = ShiftedItrSA = None


# ------------------------------------------------------------------------------------------------ the worker


def _worker(job: str, out: str) -> None:
    """One rank (RANK / WORLD_SIZE / MASTER_* from the environment)."""
    import datetime

    import torch.distributed as dist

    import fastjac as fj
    from fastjac.distributed import map_samples
    from fastjac.distributed.qr import distributed_qr

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    r, P = dist.get_rank(), dist.get_world_size()
    res = {}
    if job == "main4":  # tile the JVP's key blocks into chunks of a few keys (the tiling must not change results)
        import fastjac.distributed.tokens as tokens

        tokens.JVP_CHUNK_ELEMS = 64
    if job in ("main2", "main4"):
        for key, (name, shape, kw, mode) in (CASES if job == "main2" else CASES4).items():
            m = _model(name)
            X0, C = _inputs(m, shape)
            lr = fj.lyapunov_spectrum(m, X0, C=C, progress=False, parallel=mode, **kw)
            res[key] = dict(
                exponents=lr.exponents,
                history=lr.history,
                trivial=lr.trivial,
                renorm_used=torch.tensor(lr.settings.get("renorm_every_used", -1)),
            )
        for key, (name, shape, kw, mode) in REFUSED.items():
            m = _model(name)
            X0, C = _inputs(m, shape)
            try:
                fj.lyapunov_spectrum(m, X0, C=C, progress=False, parallel=mode, **kw)
                res[key] = "ran"
            except ValueError as e:
                res[key] = str(e)
        # distributed QR on its own: rows split unevenly, k above some ranks' local rows; CholeskyQR2 and TSQR
        g = torch.Generator().manual_seed(0)
        M = torch.randn(2, 23, 9, generator=g, dtype=F64)
        M[1, :, 8] = M[1, :, 0] + 1e-9 * M[1, :, 8]  # near-dependent column: that sample falls back to TSQR
        rows = [(p + 1) * 23 // P - p * 23 // P for p in range(P)]  # uneven: 11/12, 5/6 rows (k = 9)
        lo = sum(rows[:r])
        for kind in ("auto", "householder"):
            Q, logd, fb = distributed_qr(M[:, lo : lo + rows[r]].clone(), rows, None, kind)
            res[f"qr_{kind}"] = dict(Q=Q, logd=logd, fallback=fb, lo=lo)
        if job == "main2":
            m = _model("itrsa")
            X0, C = _inputs(m, (3, 5, 8))
            ft = fj.finite_time_lyapunov(m, X0, C=C, horizon=4, parallel="samples")
            res["finite_time"] = dict(exponents=ft.exponents, trivial=ft.trivial)
            res["map"] = dict(y=map_samples(lambda X, Cs, s: X.sum((1, 2)) + s, X0, C))
    elif job == "kill":
        name, shape, kw, mode = CASES["kill_ref"]
        import fastjac.distributed.engine as engine

        resumed = []
        load = engine.ShardCheckpoint.load
        engine.ShardCheckpoint.load = lambda self, t: (resumed.append(t), load(self, t))[1]
        m = _model("slow")
        X0, C = _inputs(m, shape)
        lr = fj.lyapunov_spectrum(
            m, X0, C=C, progress=False, parallel=mode, checkpoint=os.path.join(out, "ck"), checkpoint_every=3, **kw
        )
        res["kill"] = dict(exponents=lr.exponents, history=lr.history, resumed=torch.tensor(resumed or [-1]))
    torch.save(res, os.path.join(out, f"{job}.rank{r}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(job: str, P: int, out: str):
    port = _free_port()
    procs = []
    for r in range(P):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(r),
            WORLD_SIZE=str(P),
            LOCAL_RANK=str(r),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        env.pop("TRITON_INTERPRET", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "worker", job, out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _wait(procs, timeout=LAUNCH_TIMEOUT):
    deadline = time.time() + timeout
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    assert not bad, f"ranks failed {bad}:\n" + "\n---\n".join(log[-3000:] for log in logs)


def _load(out, job, P):
    return [torch.load(os.path.join(out, f"{job}.rank{r}.pt"), weights_only=True) for r in range(P)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank and 4-rank launches (they run side by side), their per-rank results."""
    d2, d4 = tmp_path_factory.mktemp("p2"), tmp_path_factory.mktemp("p4")
    p2, p4 = _launch("main2", 2, str(d2)), _launch("main4", 4, str(d4))
    _wait(p2)
    _wait(p4)
    return {2: _load(str(d2), "main2", 2), 4: _load(str(d4), "main4", 4)}


def _close(a, b, tol=TOL):
    assert a.shape == b.shape
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), (a, b)
    return (a[fa] - b[fb]).abs().max().item() if bool(fa.any()) else 0.0


@pytest.mark.parametrize("P", [2, 4])
def test_parallel_equals_single_process(runs, P):
    cases = CASES if P == 2 else CASES4
    for key, case in cases.items():
        ref = _single(case)
        for r, got in enumerate(runs[P]):
            g = got[key]
            dev = _close(g["exponents"], ref.exponents)
            assert dev < TOL, f"{key} rank {r} of {P}: exponents differ by {dev:.2e}"
            dev_h = _close(g["history"], ref.history)
            assert dev_h < TOL, f"{key} rank {r} of {P}: history differs by {dev_h:.2e}"
            assert torch.equal(g["trivial"], ref.trivial), key
            # every rank returns the same bytes
            assert torch.equal(g["exponents"].nan_to_num(neginf=0), runs[P][0][key]["exponents"].nan_to_num(neginf=0))


@pytest.mark.parametrize("P", [2, 4])
def test_parallel_redoes_collapsed_intervals_like_single_process(runs, P):
    # issue 19.1: the engine's collapse-and-redo rule runs in the parallel modes too (the same interval is used)
    import warnings

    for key in ("samples_collapse", "tokens_collapse"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ref = _single(CASES[key])
        assert ref.settings["renorm_every_used"] < 20 and any("renorm_every" in str(x.message) for x in w)
        for r, got in enumerate(runs[P]):
            g = got[key if P == 2 else key + "4"]
            assert int(g["renorm_used"]) == ref.settings["renorm_every_used"], (key, r)
            assert _close(g["exponents"], ref.exponents) < TOL, (key, r)


@pytest.mark.parametrize("P", [2, 4])
def test_tokens_refuses_a_subclass_that_overrides_forward(runs, P):
    # issue 19.2: exact-class dispatch; the single-process run uses autograd for it (see samples_subclass)
    for got in runs[P]:
        msg = got["tokens_subclass"]
        assert msg != "ran" and "ShiftedItrSA" in msg and msg.startswith("step:"), msg


@pytest.mark.parametrize("P", [2, 4])
def test_distributed_qr_matches_householder(runs, P):
    import fastjac as fj

    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 23, 9, generator=g, dtype=F64)
    M[1, :, 8] = M[1, :, 0] + 1e-9 * M[1, :, 8]
    _, logd_ref = fj.ops.qr(M, backend="householder")
    for kind in ("auto", "householder"):
        parts = [got[f"qr_{kind}"] for got in runs[P]]
        Q = torch.cat([p["Q"] for p in parts], 1)
        eye = torch.eye(9, dtype=F64).expand(2, 9, 9)
        torch.testing.assert_close(Q.transpose(-1, -2) @ Q, eye, atol=1e-8, rtol=0)
        R = Q.transpose(-1, -2) @ M
        torch.testing.assert_close(R.tril(-1), torch.zeros_like(R), atol=1e-8, rtol=0)  # upper triangular
        for p in parts:
            assert torch.equal(p["logd"], parts[0]["logd"])  # identical on every rank
            torch.testing.assert_close(p["logd"], logd_ref, atol=1e-7, rtol=0)
        if kind == "auto":
            assert parts[0]["fallback"].tolist() == [False, True]  # the near-dependent sample went to TSQR


def test_samples_finite_time_and_map(runs):
    import fastjac as fj

    m = _model("itrsa")
    X0, C = _inputs(m, (3, 5, 8))
    ref = fj.finite_time_lyapunov(m, X0, C=C, horizon=4)
    for got in runs[2]:
        assert _close(got["finite_time"]["exponents"], ref.exponents) < TOL
        torch.testing.assert_close(got["map"]["y"], X0.sum((1, 2)) + torch.tensor([0.0, 0.0, 2.0], dtype=F64))


def test_kill_one_rank_then_resume(runs, tmp_path):
    out = str(tmp_path)
    procs = _launch("kill", 2, out)
    deadline = time.time() + 60
    try:  # wait for a checkpoint of both ranks after burn-in, then SIGKILL rank 1 mid-run
        while time.time() < deadline:
            have = [sorted(glob.glob(os.path.join(out, f"ck.rank{r}-of2.step*"))) for r in range(2)]
            if all(have) and all(int(h[-1][-12:]) >= 6 for h in have):
                break
            assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared")
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=10)
        try:  # rank 0 notices the lost peer (gloo error) or is stopped
            procs[0].wait(timeout=10)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert not os.path.exists(os.path.join(out, "kill.rank0.pt")), "the run was not interrupted"
    _wait(_launch("kill", 2, out))
    ref = runs[2][0]["kill_ref"]
    for got in _load(out, "kill", 2):
        g = got["kill"]
        t0 = int(g["resumed"][0])
        assert 6 <= t0 < 26, f"resumed from step {t0}"
        assert torch.equal(g["exponents"], ref["exponents"])  # bit for bit the uninterrupted run
        assert torch.equal(g["history"], ref["history"])


def test_errors_without_process_group():
    import fastjac as fj

    m = _model("itrsa")
    X0, C = _inputs(m, (5, 8))
    with pytest.raises(ValueError, match="parallel"):
        fj.lyapunov_spectrum(m, X0, k=2, steps=2, parallel="samples", progress=False)
    with pytest.raises(ValueError, match="parallel"):
        fj.finite_time_lyapunov(m, X0, parallel="tokens")


def test_cli_torchrun_tokens_then_refuse_other_world_size(tmp_path):
    out = str(tmp_path / "job")
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("TRITON_INTERPRET", None)
    flags = [
        "--parallel",
        "tokens",
        "--tokens",
        "7",
        "--dim",
        "8",
        "--heads",
        "2",
        "--k",
        "4",
        "--steps",
        "6",
        "--burn-in",
        "1",
        "--quiet",
        "--checkpoint-every",
        "3",
        "--out",
        out,
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "fastjac",
    ] + flags
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    with open(os.path.join(out, "lyapunov.json")) as f:
        js = json.load(f)
    assert js["world_size"] == 2 and js["parallel"] == "tokens" and len(js["exponents"]) == 4
    # the same job as one rank: the 2-rank checkpoint is refused, naming the argument
    p1 = subprocess.run(
        [sys.executable, "-m", "fastjac"] + flags,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        cwd=ROOT,
    )
    assert p1.returncode == 2 and "checkpoint:" in p1.stderr and "world size 2" in p1.stderr, p1.stderr[-2000:]


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "worker":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[2], sys.argv[3])
