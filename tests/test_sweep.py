"""fastjac.train.sweep: a finished run is never redone, an interrupted one resumes, every run is evaluated on the
one common test set, aggregates (mean, sd, n, same-seed differences) and the CLI."""

import json
import os
import subprocess

import numpy as np
import pytest

from fastjac.data import sudoku
from fastjac.train import sweep as SW

TINY = [
    "--dim",
    "8",
    "--heads",
    "2",
    "--steps",
    "2",
    "--n-train",
    "32",
    "--n-test",
    "8",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--lyap-log-boards",
    "2",
    "--warmup",
    "1",
    "--log-every",
    "1",
]
KW = dict(jobs=1, steps=(2, 4), lyap_boards=2, n_test=12, n_train_exclude=32, progress=False)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(SW.CONFIGS, "original", ("Original", "cpu", TINY))
    monkeypatch.setitem(SW.CONFIGS, "tiny_spec", ("Spec", "cpu", TINY + ["--spec", "1e-2"]))
    return dict(KW, root=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))


def test_sweep_skips_finished_resumes_interrupted_common_test_set(tiny, tmp_path, monkeypatch):
    root = tiny["root"]
    # an interrupted run: the sweep's own command, stopped after one step (stop_at does not change the trajectory)
    cmd = SW.train_command("tiny_spec", 1, root, cache_dir=tiny["cache_dir"]) + ["--stop-at", "1"]
    os.makedirs(SW.run_dir(root, "tiny_spec", 1))
    subprocess.run(cmd, check=True, capture_output=True)
    assert SW.status(root, "tiny_spec", 1) == "interrupted"
    out = str(tmp_path / "s.json")
    s = SW.sweep(["original", "tiny_spec"], [0, 1], out=out, **tiny)
    assert s["status"] == {"finished": 4, "unfinished": []}
    log = [json.loads(l) for l in open(os.path.join(SW.run_dir(root, "tiny_spec", 1), "log.jsonl"))]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # resumed: step 1 logged once, by the first process
    # every run was evaluated on the same test set, the one common_test_set returns, disjoint from training
    ts = SW.common_test_set(4, n_test=12, n_train=32, cache_dir=tiny["cache_dir"])
    h = SW.testset_hash(ts)
    assert {r["test_hash"] for r in s["runs"]} == {h} and s["test_sets"]["4"]["hash"] == h
    train = {
        bytes(p.astype(np.int8))
        for seed in SW.EXCLUDE_SEEDS
        for p in sudoku.generate(32, size=4, seed=seed, cache_dir=tiny["cache_dir"])[0]
    }
    assert not any(bytes(p.astype(np.int8)) in train for p in ts["test_id"][0])
    assert ts["test_id"][0].shape == (12, 16) and ts["test_ood"][0].shape == (12, 16)
    # aggregates: n, mean, sd over seeds; same-seed differences against the unregularised run
    a = s["configs"]["tiny_spec"]
    k = "test_ood/T4/cell"
    vals = [r["metrics"][k] for r in s["runs"] if r["config"] == "tiny_spec"]
    assert a["stats"][k]["n"] == 2 and abs(a["stats"][k]["mean"] - np.mean(vals)) < 1e-12
    assert abs(a["stats"][k]["sd"] - np.std(vals, ddof=1)) < 1e-12
    base = {r["seed"]: r["metrics"][k] for r in s["runs"] if r["config"] == "original"}
    d = [r["metrics"][k] - base[r["seed"]] for r in s["runs"] if r["config"] == "tiny_spec"]
    assert abs(a["diff_vs_baseline"][k]["mean"] - np.mean(d)) < 1e-12
    assert all(r["lyapunov"]["boards"] == 2 and r["lyapunov"]["max_se"] is not None for r in s["runs"])
    assert json.load(open(out))["configs"]["tiny_spec"]["baseline"] == "original"
    md = SW.markdown(s)
    assert "| Spec | 2 |" in md and "Finished runs: 4; not finished: none." in md
    # again: nothing is retrained (no process is started) and the cached evaluations are reused
    stamps = {r["dir"]: os.path.getmtime(os.path.join(r["dir"], "DONE")) for r in s["runs"]}

    def no_popen(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(SW.subprocess, "Popen", no_popen)
    s2 = SW.sweep(["original", "tiny_spec"], [0, 1], **tiny)
    assert s2["configs"]["tiny_spec"]["stats"][k] == a["stats"][k]
    assert stamps == {r["dir"]: os.path.getmtime(os.path.join(r["dir"], "DONE")) for r in s2["runs"]}


def test_sweep_cli_no_train_and_errors(tiny, tmp_path, capsys):
    assert SW.main(["--grid", "nope"]) == 2
    assert SW.main(["--configs", "original", "--seeds", "x"]) == 2
    assert SW._seeds(["0-2", "5"]) == [0, 1, 2, 5]
    assert SW.main(["--grid", "fig3@x"]) == 2
    out = str(tmp_path / "n.json")
    rc = SW.main(
        [
            "--configs",
            "original",
            "--seeds",
            "3",
            "--root",
            tiny["root"],
            "--no-train",
            "--out",
            out,
            "--quiet",
            "--cache-dir",
            tiny["cache_dir"],
            "--steps",
            "2",
            "--lyap-boards",
            "0",
            "--jobs",
            "1",
        ]
    )
    s = json.load(open(out))
    assert rc == 0 and s["status"]["unfinished"] == [["original", 3, "missing"]]
    assert "--seeds 3" in s["resume_command"] and "--no-train" not in s["resume_command"]
    out2 = str(tmp_path / "g.json")  # GRID@SEEDS: a grid with its own seeds
    assert (
        SW.main(
            [
                "--grid",
                "fig4@1",
                "--configs",
                "original",
                "--seeds",
                "3",
                "--root",
                tiny["root"],
                "--no-train",
                "--out",
                out2,
                "--quiet",
                "--lyap-boards",
                "0",
                "--jobs",
                "1",
            ]
        )
        == 0
    )
    assert sorted(map(tuple, json.load(open(out2))["status"]["unfinished"])) == [
        ("akorn", 1, "missing"),
        ("original", 1, "missing"),
        ("original", 3, "missing"),
    ]
    assert SW.baseline_of("akorn") == "akorn" and SW.baseline_of("s6_lyap_t0") == "s6_original"
    assert SW.lyap_target("lyap_w1_board_t-0.15") == -0.15


def test_sweep_imports_finished_runs_of_an_earlier_summary(tiny, tmp_path, monkeypatch):
    """Run folders that were not kept: --import takes their records from the earlier summary JSON, trains nothing
    for them, and refuses a summary evaluated on another test set or other T values."""
    import shutil

    out = str(tmp_path / "first.json")
    s = SW.sweep(["original", "tiny_spec"], [0], out=out, **tiny)
    shutil.rmtree(SW.run_dir(tiny["root"], "tiny_spec", 0))
    assert SW.status(tiny["root"], "tiny_spec", 0) == "missing"

    def no_popen(*a, **k):
        raise AssertionError("an imported run was trained again")

    monkeypatch.setattr(SW.subprocess, "Popen", no_popen)
    s2 = SW.sweep(["original", "tiny_spec"], [0], imports=[out], **tiny)
    rec = {r["config"]: r for r in s2["runs"]}
    assert rec["tiny_spec"]["imported_from"] == out and "imported_from" not in rec["original"]
    assert s2["imported_runs"] == 1 and s2["status"]["finished"] == 2
    assert s2["configs"]["tiny_spec"]["stats"] == s["configs"]["tiny_spec"]["stats"]
    with pytest.raises(ValueError, match="evaluated with"):
        SW.sweep(["original", "tiny_spec"], [0], imports=[out], **dict(tiny, steps=(2,)))
    with pytest.raises(ValueError, match="not a readable sweep summary"):
        SW.sweep(["tiny_spec"], [0], imports=[str(tmp_path / "nope.json")], **tiny)
    # NAME@SEEDS on --configs; --import of a file that is not a summary is exit status 2
    out3 = str(tmp_path / "c.json")
    argv = ["--configs", "original@5", "tiny_spec@6-7", "--root", tiny["root"], "--no-train", "--out", out3]
    argv += ["--quiet", "--lyap-boards", "0", "--jobs", "1"]
    assert SW.main(argv) == 0
    assert sorted(map(tuple, json.load(open(out3))["status"]["unfinished"])) == [
        ("original", 5, "missing"),
        ("tiny_spec", 6, "missing"),
        ("tiny_spec", 7, "missing"),
    ]
    assert SW.main(argv + ["--import", str(tmp_path / "nope.json")]) == 2


def test_stats_ci95_is_the_t_interval():
    """ci95 = t_{0.975, n-1} sd / sqrt(n) (t from tables: 4.303 at df 2, 2.776 at df 4); None for one value."""
    s = SW._stats([1.0, 2.0, 3.0])
    assert abs(s["ci95"] - 4.303 / 3**0.5) < 1e-9 and s["sd"] == 1.0
    s5 = SW._stats([0.1, 0.3, 0.2, 0.5, 0.4])
    assert abs(s5["ci95"] - 2.776 * np.std([0.1, 0.3, 0.2, 0.5, 0.4], ddof=1) / 5**0.5) < 1e-9
    assert SW._stats([1.0])["ci95"] is None and SW._stats([])["n"] == 0
