"""Real SIGINT/SIGTERM at random times into `python -m fastjac train` subprocesses, then the same command again;
the resumed run must end with the weights and EMA of an uninterrupted run, bit for bit, and a log.jsonl that holds
every step once (issue 20, item 1). A stress run by hand (minutes), not a test:

    python bench/stress_train_signals.py 15          # 15 trials, in a temporary folder

Measured 2026-12-02 on the shared 2-core machine (load ~8-11): 15 trials (6 SIGINT, 9 SIGTERM, signals 0-4 s
after the first logged step, --ema 0.9, --checkpoint-every 200): 15 interrupted (exit 130 / 143), 15 bit-exact,
15 without repeated log lines.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--dim",
    "8",
    "--heads",
    "2",
    "--steps",
    "2",
    "--n-train",
    "64",
    "--n-test",
    "8",
    "--batch-size",
    "8",
    "--epochs",
    "40",
    "--eval-steps",
    "2",
    "--lyap-samples",
    "0",
    "--quiet",
    "--ema",
    "0.9",
    "--threads",
    "1",
    "--log-every",
    "1",
    "--checkpoint-every",
    "200",
]


def run(work: str, out: str, sig=None, delay=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(
        [sys.executable, "-m", "fastjac", "train", *ARGS, "--cache-dir", work + "/cache", "--out", out],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if sig:  # once training runs (its first log line), after a random delay
        while not os.path.exists(out + "/log.jsonl") and p.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(sig)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def same(a, b) -> bool:
    import torch

    if a["step"] != b["step"]:
        return False
    return all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])


def main(n: int) -> dict:
    import torch

    work = tempfile.mkdtemp(prefix="fastjac_stress_")
    rc, err = run(work, work + "/ref")
    assert rc == 0, err
    ref = torch.load(work + "/ref/checkpoint.pt", weights_only=True)
    rng = random.Random(0)
    stats = dict(trials=0, interrupted=0, bit_exact=0, dup_free=0, rcs={})
    for t in range(n):
        out = f"{work}/t{t}"
        sig, delay = rng.choice([signal.SIGINT, signal.SIGTERM]), rng.uniform(0.0, 4.0)
        rc, err = run(work, out, sig, delay)
        stats["rcs"][str(rc)] = stats["rcs"].get(str(rc), 0) + 1
        stats["interrupted"] += rc != 0
        rc2, err2 = run(work, out)
        assert rc2 == 0, err2
        got = torch.load(out + "/checkpoint.pt", weights_only=True)
        recs = [json.loads(line) for line in open(out + "/log.jsonl")]
        steps = [r["step"] for r in recs if "loss" in r]
        stats["trials"] += 1
        stats["bit_exact"] += same(got, ref)
        stats["dup_free"] += steps == sorted(set(steps)) == list(range(1, ref["step"] + 1))
        last = (err.strip().splitlines() or [""])[-1][:90]
        print(t, sig.name, f"{delay:.2f}", rc, "interrupted at", last, flush=True)
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
