"""Shared helpers of the example scripts: output folder, JSON writing, timing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
        help="output directory for the PNG and JSON (default: examples/out/)",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, a few seconds")
    p.add_argument("--seed", type=int, default=0)
    return p


def write_json(path: str, payload: dict) -> None:
    payload = dict(
        payload, torch=torch.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S")
    )
    with open(path, "w") as f:
        # results are tensors (0-dim or [B]) since 0.2: write their values
        json.dump(payload, f, indent=1, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o))
