"""Train the model that ships with fastjac (fastjac/train/weights/) and that ``python -m fastjac`` analyses.

    python examples/train_default_model.py            # ~1-6 min on 2 CPU cores, depending on the load

It runs ``python -m fastjac train --preset cpu`` (ItrSA, l2 norm, D = 32, H = 4, T = 16, 4x4 Sudoku, seed 0) into
examples/out/default_model/, then writes
  fastjac/train/weights/itrsa_sudoku4.safetensors      the recurrent core (fj.save_model, float64; metadata: info)
  fastjac/train/weights/itrsa_sudoku4_net.safetensors  the whole Sudoku model (embedding, positions, core, readout)
The held-out example board of ``fastjac.train.pretrained.load_default()`` is the first in-distribution test board.
Training is deterministic given the seed on one machine (the result can differ in the last bits elsewhere).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import fastjac as fj  # noqa: E402
from fastjac.train import pretrained  # noqa: E402
from fastjac.train.loop import TrainConfig, load_data, load_net, save_net, train  # noqa: E402


def main():
    out = os.path.join(HERE, "out", "default_model")
    cfg = TrainConfig.preset("cpu", out=out, seed=0, lyap_samples=8, threads=1, progress=False)
    res = train(cfg)
    if "stopped_at" in res:
        return 1
    data = load_data(cfg)
    puzzle = data["test_id"][0][0]
    solution = data["test_id"][1][0]
    info = dict(
        what="ItrSA core (l2 norm, D=32, H=4, T=16) of a 4x4 Sudoku model trained by fastjac",
        trained_by="python examples/train_default_model.py (= python -m fastjac train --preset cpu --seed 0)",
        config=res["config"],
        train_time_s=res["train_time_s"],
        eval=res["eval"],
        lyapunov=res["lyapunov"],
        example_puzzle=puzzle.tolist(),
        example_solution=solution.tolist(),
        torch=torch.__version__,
        date=res["date"],
    )
    os.makedirs(pretrained.WEIGHTS, exist_ok=True)
    net = load_net(os.path.join(out, "sudoku_net.safetensors"))
    core = fj.load_model(os.path.join(out, "model.safetensors")).double()
    fj.save_model(core, pretrained.CORE_FILE, metadata={"info": json.dumps(info)})
    save_net(net, pretrained.NET_FILE, info=dict(what=info["what"], trained_by=info["trained_by"]))
    for p in (pretrained.CORE_FILE, pretrained.NET_FILE):
        print(f"wrote {p} ({os.path.getsize(p) / 1024:.1f} KB)")
    print(json.dumps({k: info[k] for k in ("eval", "lyapunov")}, indent=1)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
