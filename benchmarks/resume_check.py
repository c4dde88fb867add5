"""A training run killed and resumed, against the unbroken run, on any device.

    python benchmarks/resume_check.py --device cuda --out gpu_check/resume

Draws a small embedded world (64 train and 16 val images) and trains the world recipe on it
for 30 iterations (checkpoints every 5, RFM from 10): once unbroken, once killed with SIGKILL
as soon as iteration 15 is logged and run again to the end. Every training process runs under
``torch.cuda.set_sync_debug_mode("warn")`` on a GPU, and records where each host sync came from
(the training step, or the logging, evaluation and checkpoints around it). Prints and writes
``resume.json``: whether the resumed run's losses and decoder equal the unbroken one's (bit for
bit, and the largest differences), and the syncs by origin.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ITERS, KILL_AFTER = 30, 15


def params(out: Path, device: str, run: str):
    from pipeline.params import load_params

    return load_params(ROOT / "params" / "world.yaml", {
        "data.out": str(out / "prepared"), "data.world.n_train": 64, "data.world.n_val": 16,
        "train.device": device, "train.iters": ITERS, "train.rfm_start": 10,
        "train.log_every": 5, "train.checkpoint_every": 5, "train.eval_every": ITERS,
        "train.eval_images": 8, "train.workers": 2, "train.out": str(out / run)})


# Where a sync was made: the innermost of these frames on its stack.
ORIGINS = (("weclip/training.py", "__call__", "training step"),
           ("pipeline/train.py", "log", "logging"),
           ("pipeline/train.py", "evaluation", "evaluation"),
           ("pipeline/train.py", "save_checkpoint", "checkpoint"),
           ("pipeline/train.py", "finish", "model file"))


def origin(stack) -> str:
    for frame in reversed(stack):
        for file, function, label in ORIGINS:
            if frame.filename.endswith(file) and frame.name == function:
                return label
    return "other"


def train_process(out: Path, device: str, run: str) -> None:
    """One training process (the child): syncs recorded by where they were made."""
    import traceback
    import warnings
    from collections import Counter

    import torch

    from pipeline.train import train

    syncs = Counter()

    def record(message, *args, **kwargs):
        if "synchroniz" in str(message):
            syncs[origin(traceback.extract_stack())] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    train(params(out, device, run))
    (out / run / "syncs.json").write_text(json.dumps(syncs))


def run(out: Path, device: str, name: str, kill_after: int | None = None) -> float:
    """Train ``name`` in a child process (killed once ``kill_after`` is logged); seconds."""
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, __file__, "--child", name, "--device", device,
                              "--out", str(out)], cwd=ROOT)
    losses = out / name / "losses.csv"
    while child.poll() is None:
        if kill_after and losses.exists() and any(
                line.startswith(f"{kill_after},") for line in losses.read_text().splitlines()):
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(0.05)
    if child.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"error: training {name} ended with exit code {child.returncode}")
    return time.monotonic() - start


def compare(out: Path) -> dict:
    import torch

    rows = {run: [line.split(",") for line in (out / run / "losses.csv").read_text().splitlines()[1:]]
            for run in ("unbroken", "resumed")}
    losses = [torch.tensor([[float(v) for v in row[1:4]] for row in rows[run]]) for run in rows]
    decoders = [torch.load(out / run / "model.pt", map_location="cpu")["decoder"] for run in rows]
    weight_diff = max(float((decoders[0][k] - decoders[1][k]).abs().max()) for k in decoders[0])
    return {"iterations_logged": [int(r[0]) for r in rows["resumed"]],
            "losses_equal": bool(torch.equal(losses[0], losses[1])),
            "losses_max_difference": float((losses[0] - losses[1]).abs().max()),
            "decoder_equal": all(torch.equal(decoders[0][k], decoders[1][k]) for k in decoders[0]),
            "decoder_max_difference": weight_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check/resume"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    if args.child:
        return train_process(out, args.device, args.child)

    from pipeline.datasets.world import generate_world

    p = params(out, args.device, "unbroken")
    generate_world(p.dataset_dir, seed=0, **{**vars(p.data.world), "n_pretrain": 0})
    seconds = {"unbroken": run(out, args.device, "unbroken")}
    seconds["killed"] = run(out, args.device, "resumed", kill_after=KILL_AFTER)
    killed_at = len((out / "resumed" / "losses.csv").read_text().splitlines()) - 1
    seconds["resumed"] = run(out, args.device, "resumed")
    result = {"device": args.device, "iterations": ITERS, "killed_after_logged_iteration": KILL_AFTER,
              "rows_when_killed": killed_at, **compare(out), "seconds": seconds,
              "syncs": {run: json.loads((out / run / "syncs.json").read_text())
                        for run in ("unbroken", "resumed")}}
    (out / "resume.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
