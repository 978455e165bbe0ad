"""Training: a few steps per model and regulariser, resume equals an uninterrupted run, CLI, save/load."""
import json
import os

import pytest
import torch

import fastjac as fj
from fastjac.train import loop
from fastjac.train.loop import TrainConfig


@pytest.fixture(scope="module")
def data():
    cfg = TrainConfig(size=4, n_train=64, n_test=16, progress=False)
    from fastjac.data import sudoku

    sp = sudoku.splits(4, n_train=64, n_test=16, seed=0, cache=False)
    return {k: (torch.from_numpy(p), torch.from_numpy(s)) for k, (p, s) in sp.items()}


def _cfg(tmp_path, name, **kw):
    base = dict(size=4, dim=16, heads=2, steps=4, batch_size=16, n_train=64, n_test=16, epochs=1, lr=1e-3,
                eval_steps=(4, 8), lyap_samples=1, progress=False, out=str(tmp_path / name), log_every=1,
                reg_samples=2, probes=2, lyap_k=2, warmup=2)
    base.update(kw)
    return TrainConfig(**base)


REGS = [dict(), dict(spec=1e-2), dict(e_single=1e-2), dict(e_multi=1e-2), dict(e_multi_hard=True),
        dict(jac_frob=1e-2), dict(jac_spec=1e-2), dict(lyap=1e-1)]


@pytest.mark.parametrize("kind", ["itrsa", "akorn"])
@pytest.mark.parametrize("reg", REGS, ids=lambda r: "-".join(r) or "plain")
def test_smoke_each_model_and_regulariser(tmp_path, data, kind, reg):
    cfg = _cfg(tmp_path, "r", kind=kind, **reg)
    res = loop.train(cfg, data)
    assert res["steps"] == 4 and set(res["eval"]) == {"test_id", "test_ood"}
    assert set(res["eval"]["test_id"]) == {"4", "8"}
    logs = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
    for name, w in reg.items():
        if isinstance(w, float):
            assert all(name in r for r in logs if "loss" in r)  # the term was computed and logged
            assert all(torch.isfinite(torch.tensor(r[name])) for r in logs if "loss" in r)
    m = fj.load_model(os.path.join(cfg.out, "model.safetensors"))
    assert type(m).__name__ == ("ItrSA" if kind == "itrsa" else "AKOrN")
    net = loop.load_net(os.path.join(cfg.out, "sudoku_net.safetensors"))
    p = data["test_id"][0][:3]
    assert net(p).shape == (3, 16, 4)


@pytest.mark.parametrize("reg", [dict(spec=1e-2, jac_frob=1e-2, lyap=1e-1), dict(e_multi=1e-2, ema=0.9)])
def test_resume_equals_uninterrupted(tmp_path, data, reg):
    full = _cfg(tmp_path, "full", epochs=2, **reg)
    loop.train(full, data)
    part = _cfg(tmp_path, "part", epochs=2, stop_at=3, **reg)
    r = loop.train(part, data)
    assert r["stopped_at"] == 3
    part.stop_at = 0
    loop.train(part, data)  # resumes from step 3
    a = torch.load(os.path.join(full.out, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(part.out, "checkpoint.pt"), weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra = json.load(open(os.path.join(full.out, "results.json")))
    rb = json.load(open(os.path.join(part.out, "results.json")))
    assert ra["eval"] == rb["eval"]


def test_resume_refuses_other_settings(tmp_path, data):
    loop.train(_cfg(tmp_path, "x", stop_at=2), data)
    with pytest.raises(ValueError, match="other settings"):
        loop.train(_cfg(tmp_path, "x", lr=5e-3), data)


def test_cli_and_config_errors(tmp_path):
    from fastjac.train.cli import main

    out = str(tmp_path / "cli")
    rc = main(["--preset", "cpu", "--dim", "16", "--heads", "2", "--steps", "3", "--n-train", "32", "--n-test",
               "8", "--batch-size", "16", "--epochs", "1", "--eval-steps", "3", "--lyap-samples", "0", "--quiet",
               "--out", out, "--cache-dir", str(tmp_path / "cache"), "--jac-frob", "0.01"])
    assert rc == 0 and os.path.exists(os.path.join(out, "results.json"))
    assert main(["--kind", "rnn", "--out", out]) == 2
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.preset("gpu")
    with pytest.raises(ValueError, match="spec"):
        TrainConfig(spec=-1.0).validate()


def test_shipped_default_model():
    from fastjac.train import pretrained

    if not os.path.isfile(pretrained.CORE_FILE):
        pytest.skip("weights not built (python examples/train_default_model.py)")
    model, X0, C = pretrained.load_default()
    assert type(model).__name__ == "ItrSA" and model.wq.dtype == torch.float64
    assert X0.shape == C.shape == (16, model.dim) and X0.dtype == torch.float64
    info = pretrained.DEFAULT_INFO
    assert info["eval"]["test_id"]["16"]["board"] > 0.5 and len(info["example_puzzle"]) == 16
    net = pretrained.load_net()
    p = torch.tensor(info["example_puzzle"]).unsqueeze(0)
    assert torch.allclose(net.inputs(p)[1][0], C)
    Y = model(X0, C)  # the core is the one inside the Sudoku model
    assert torch.allclose(Y, net.core(X0, C))
    assert sum(os.path.getsize(f) for f in (pretrained.CORE_FILE, pretrained.NET_FILE)) < 400_000
