"""The command-line package (fastjac.cli): the parallel job runs the main job's model by default (issue 19.4),
checks its output folder before any compute and never loses a finished result to a failed checkpoint write
(issue 20.3), and FASTJAC_SAMPLES is validated with a message naming it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMALL = ["--k", "4", "--steps", "4", "--burn-in", "1", "--quiet"]


def _env():
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for k in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_env(monkeypatch):
    """torch.distributed's environment for a one-rank gloo group in this process (restored afterwards)."""
    for k, v in dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        GLOO_SOCKET_IFNAME="lo",
    ).items():
        monkeypatch.setenv(k, v)


def test_parallel_tokens_default_runs_the_main_jobs_trained_model(tmp_path):
    # issue 19.4: with default options both jobs run the shipped trained model on its puzzle (S = 16)
    single, par = tmp_path / "single", tmp_path / "par"
    p = subprocess.run(
        [sys.executable, "-m", "fastjac"] + SMALL + ["--out", str(single)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "fastjac",
            "--parallel",
            "tokens",
        ]
        + SMALL
        + ["--out", str(par)]
    )
    q = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-3000:]
    a, b = (json.loads((d / "lyapunov.json").read_text()) for d in (single, par))
    assert a["model_kind"] == b["model_kind"] == "trained" and a["model"] == b["model"]
    assert a["settings"]["shape"] == b["settings"]["shape"] == [16, 32]
    assert b["parallel"] == "tokens" and b["world_size"] == 2
    for x, y in zip(a["exponents"], b["exponents"]):
        assert abs(x - y) < 1e-10
    assert "model (trained)" in q.stdout and "S=16 tokens" in q.stdout


@pytest.mark.parametrize("value", ["abc", "0", "2.5"])
def test_fastjac_samples_must_be_an_int(value, monkeypatch, capsys):
    from fastjac.cli import main

    monkeypatch.setenv("FASTJAC_SAMPLES", value)
    assert main(["--parallel", "samples", "--out", "unused"] + SMALL) == 2
    err = capsys.readouterr().err
    assert "FASTJAC_SAMPLES" in err and "expected an int >= 1" in err


def test_parallel_job_refuses_an_unwritable_out_before_any_compute(tmp_path, one_rank_env, capsys, monkeypatch):
    import fastjac.analysis.lyapunov as lyap
    from fastjac.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(lyap, "lyapunov_spectrum", lambda *a, **k: pytest.fail("computed before checking --out"))
    rc = main(
        ["--parallel", "tokens", "--tokens", "5", "--dim", "8", "--heads", "2", "--out", str(blocker / "sub")] + SMALL
    )
    assert rc == 2 and "--out: cannot write" in capsys.readouterr().err


def test_parallel_job_keeps_the_result_when_its_final_checkpoint_fails(tmp_path, one_rank_env, monkeypatch, capsys):
    import torch

    import fastjac.distributed.engine as engine
    from fastjac.cli import main

    real = torch.save

    def failing(obj, f, *a, **k):
        name = getattr(f, "name", f)  # the shard writer passes a file object (a full disk is then an OSError)
        if isinstance(name, str) and ".partial-rank" in name and obj["state"]["t"] >= 5:  # the final write
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(engine.torch, "save", failing)
    out = tmp_path / "o"
    with pytest.warns(RuntimeWarning, match="could not write its checkpoint"):
        rc = main(
            [
                "--parallel",
                "tokens",
                "--tokens",
                "5",
                "--dim",
                "8",
                "--heads",
                "2",
                "--out",
                str(out),
                "--checkpoint-every",
                "2",
            ]
            + SMALL
        )
    assert rc == 0
    d = json.loads((out / "lyapunov.json").read_text())
    assert len(d["exponents"]) == 4 and d["steps"] == 4 and len(d["stderr"]) == 4
    assert "lambda_max =" in capsys.readouterr().out


def test_main_job_prints_standard_errors_and_honours_tol(tmp_path, capsys):
    from fastjac.cli import main

    out = tmp_path / "run"
    args = [
        "--tokens",
        "5",
        "--dim",
        "8",
        "--heads",
        "2",
        "--k",
        "3",
        "--steps",
        "400",
        "--burn-in",
        "5",
        "--tol",
        "10",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "+-" in text and "--tol 10" in text
    d = json.loads((out / "lyapunov.json").read_text())
    assert d["settings"]["stopped_early"] and d["steps"] < 400 and d["max_stderr"] < 10


def test_subcommands_are_listed_and_external_ones_dispatch(monkeypatch, capsys):
    import fastjac.cli as cli

    assert set(cli.EXTERNAL_JOBS) >= {"train", "build", "aot", "sweep"}
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    # a subsystem module without main(argv) is reported, not a traceback
    monkeypatch.setitem(cli.EXTERNAL_JOBS, "train", ("json", "stand-in"))
    assert cli.main(["train"]) == 2 and "has no main(argv)" in capsys.readouterr().err
