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
    from fastjac.data import sudoku

    sp = sudoku.splits(4, n_train=64, n_test=16, seed=0, cache=False)
    return {k: (torch.from_numpy(p), torch.from_numpy(s)) for k, (p, s) in sp.items()}


def _cfg(tmp_path, name, **kw):
    base = dict(
        size=4,
        dim=16,
        heads=2,
        steps=4,
        batch_size=16,
        n_train=64,
        n_test=16,
        epochs=1,
        lr=1e-3,
        eval_steps=(4, 8),
        lyap_samples=1,
        progress=False,
        out=str(tmp_path / name),
        log_every=1,
        reg_samples=2,
        probes=2,
        lyap_k=2,
        warmup=2,
        reg_warmup=0,  # these tests exercise the terms from the first step; the automatic schedule is tested below
        reg_ramp=0,
    )
    base.update(kw)
    return TrainConfig(**base)


REGS = [
    dict(),
    dict(spec=1e-2),
    dict(e_single=1e-2),
    dict(e_multi=1e-2),
    dict(e_multi_hard=True),
    dict(jac_frob=1e-2),
    dict(jac_spec=1e-2),
    dict(lyap=1e-1),
]


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
    rc = main(
        [
            "--preset",
            "cpu",
            "--dim",
            "16",
            "--heads",
            "2",
            "--steps",
            "3",
            "--n-train",
            "32",
            "--n-test",
            "8",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--eval-steps",
            "3",
            "--lyap-samples",
            "0",
            "--quiet",
            "--out",
            out,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--jac-frob",
            "0.01",
        ]
    )
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


# ----------------------------------------------------------------------------------------------- Lyapunov options


def test_loop_passes_lyapunov_options(tmp_path, data, monkeypatch):
    """The loop hands lyap_iters / form / aggregate / boards to the penalty (fails if any is dropped)."""
    from fastjac.train import regularizers as R

    seen = []
    real = R.lyapunov_penalty

    def spy(step, X0, **kw):
        seen.append(dict(kw, boards=X0.shape[0]))
        return real(step, X0, **kw)

    monkeypatch.setattr(R, "lyapunov_penalty", spy)
    cfg = _cfg(
        tmp_path, "spy", lyap=0.1, lyap_iters=3, lyap_form="above", lyap_aggregate="batch", lyap_boards=3, stop_at=1
    )
    loop.train(cfg, data)
    assert seen and all(
        s["iters"] == 3 and s["form"] == "above" and s["aggregate"] == "batch" and s["boards"] == 3 for s in seen
    )
    monkeypatch.setattr(R, "lyapunov_penalty", real)
    # and the value: the term equals a direct call with those iters, and iters changes it
    net = loop.build_net(_cfg(tmp_path, "v", lyap=0.1))
    logits, xs, C = net(data["train"][0][:4], return_states=True)
    vals = {}
    for it in (0, 2):
        c = _cfg(tmp_path, "v", lyap=0.1, lyap_iters=it)
        vals[it] = loop.regularizer_terms(c, net, xs, C, 0)["lyap"]
        ref = real(net.core, xs[0][:2], C=C[:2], target=0.1, horizon=4, k=2, iters=it, seed=0)
        assert torch.allclose(vals[it], ref)
    assert not torch.allclose(vals[0], vals[2])


def test_fingerprint_new_fields_and_cli_flags():
    from fastjac.train.cli import _parser

    fp = lambda **kw: loop._fingerprint(TrainConfig(**kw).validate())  # noqa: E731
    # with the Lyapunov term off its options cannot change the trajectory: old checkpoints keep resuming
    assert fp() == fp(lyap_iters=0) == fp(lyap_form="above", lyap_boards=2) == fp(lyap_log_boards=0)
    assert fp(lyap=1.0, lyap_iters=1) != fp(lyap=1.0, lyap_iters=0)
    assert fp(lyap=1.0) != fp(lyap=1.0, lyap_form="below") != fp(lyap=1.0, lyap_aggregate="batch")
    assert fp(spec=1e-3) != fp(spec=1e-3, reg_warmup=5)
    a = _parser().parse_args(["--lyap-iters", "2", "--lyap-form", "below", "--reg-ramp", "7"])
    assert (a.lyap_iters, a.lyap_form, a.reg_ramp) == (2, "below", 7)
    assert TrainConfig().lyap_iters == 1
    for bad in (dict(lyap_iters=-1), dict(lyap_form="hinge"), dict(lyap_aggregate="x"), dict(reg_warmup=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad).validate()


def test_automatic_schedule_with_the_lyapunov_term():
    """reg_warmup / reg_ramp = -1 (the defaults): 10 % of the configured steps each with lyap > 0, else 0; an
    explicit value wins; the fingerprint of a run without the Lyapunov term is what it was before."""
    c = TrainConfig.preset("cpu", lyap=1.0).validate()
    assert (c.reg_warmup, c.reg_ramp) == (250, 250)  # 125 steps x 20 epochs
    assert (TrainConfig.preset("cpu", spec=1e-4).validate().reg_warmup, TrainConfig().validate().reg_ramp) == (0, 0)
    c = TrainConfig.preset("cpu", lyap=1.0, reg_warmup=0).validate()
    assert (c.reg_warmup, c.reg_ramp) == (0, 250)
    assert TrainConfig.preset("cpu6", lyap=1.0).validate().reg_warmup == 750  # 250 steps x 30 epochs
    fp = lambda **kw: loop._fingerprint(TrainConfig(**kw).validate())  # noqa: E731
    assert fp() == fp(reg_warmup=0, reg_ramp=0) and fp(spec=1e-3) == fp(spec=1e-3, reg_warmup=0)
    assert fp(lyap=1.0) == fp(lyap=1.0, reg_warmup=250, reg_ramp=250) != fp(lyap=1.0, reg_warmup=0, reg_ramp=0)
    with pytest.raises(ValueError, match="reg_warmup: expected an int >= 0, or -1"):
        TrainConfig(reg_warmup=-2).validate()


def test_warmup_and_heldout_log_do_not_touch_training_rng(tmp_path, data):
    """reg_warmup switches the terms off for its steps; the per-epoch held-out lambda_max log changes nothing."""
    c = _cfg(tmp_path, "w", lyap=0.1, reg_warmup=2, epochs=2)
    res = loop.train(c, data)
    logs = [json.loads(l) for l in open(os.path.join(c.out, "log.jsonl"))]
    steps = [r for r in logs if "loss" in r]
    assert "lyap" not in steps[0] and "lyap" not in steps[1] and "lyap" in steps[2]
    held = res["heldout_lambda_max_per_epoch"]
    assert [h["epoch"] for h in held] == [0, 1] and all(h["boards"] == 16 and h["se"] > 0 for h in held)
    c2 = _cfg(tmp_path, "w0", lyap=0.1, reg_warmup=2, epochs=2, lyap_log_boards=0)
    res2 = loop.train(c2, data)
    assert res2["heldout_lambda_max_per_epoch"] == []
    a = torch.load(os.path.join(c.out, "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(c2.out, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
