"""This project's WeCLIP training step against the authors' released one, on one device.

    python benchmarks/compare_authors.py --authors path/to/WeCLIP-repo/WeCLIP \\
        --authors-python path/to/their-env/bin/python [--rfm] [--amp]

Both steps get the same random ViT-B/16 weights (written in OpenAI's state-dict layout, which
both load), a batch of 4 random 320 x 320 images with the same class labels (1-3 of VOC's 20),
and are timed after warm-up. The authors' step runs in its own Python (their requirements pin
numpy < 2 and older packages) through ``authors_step.py``; their code needs CUDA. ``--rfm``
times both in the second half of training (RFM refinement), the default the first (static).
Prints both step times, their ratio and the peak memory of each.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weclip import ClassInfo, ModelConfig, create_clip, create_model
from weclip.benchmark import random_batch, synchronize
from weclip.optim import build_optimizer, poly_warmup
from weclip.training import TrainStep

ARCH = "ViT-B-16-quickgelu"  # OpenAI's ViT-B/16, which the authors' CLIP code builds
VOC = [f"class {i}" for i in range(1, 21)]


def our_step_s(weights: Path, batch, device: torch.device, steps: int, warmup: int,
               rfm: bool, amp: bool) -> tuple[float, float]:
    """Seconds per training step of this project, and peak memory in MB."""
    classes = ClassInfo("voc", VOC, VOC, ["ground", "sky", "wall"])
    model = create_model(ModelConfig(arch=ARCH, weights=str(weights)), classes).to(device)
    optimizer = build_optimizer(model)
    step = TrainStep(model, optimizer, poly_warmup(optimizer, 30000), amp=amp)
    batch = batch.to(device)
    refinement = "rfm" if rfm else "static"
    for _ in range(warmup):
        step(batch, refinement)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch, refinement)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - start) / steps, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, type=Path,
                        help="the WeCLIP/ folder of the authors' repository")
    parser.add_argument("--authors-python", default=sys.executable,
                        help="a Python with the authors' requirements")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rfm", action="store_true")
    parser.add_argument("--amp", action="store_true", help="this project's step in bfloat16")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    weights = work / "ViT-B-16-random.pt"
    torch.save(create_clip(ARCH).state_dict(), weights)
    batch = random_batch(4, 320, len(VOC), torch.Generator().manual_seed(0))
    labels = [[int(c) + 1 for c in row.nonzero().flatten()] for row in batch.labels]
    (work / "labels.json").write_text(json.dumps(labels))

    ours, our_peak = our_step_s(weights, batch, torch.device(args.device), args.steps,
                                args.warmup, args.rfm, args.amp)
    command = [args.authors_python, str(Path(__file__).with_name("authors_step.py")),
               "--authors", str(args.authors), "--weights", str(weights),
               "--labels", str(work / "labels.json"), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--rfm"] if args.rfm else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the authors' step failed:\n{result.stderr[-3000:]}")
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"device: {name}; batch 4, crop 320, random ViT-B/16, "
          f"{'RFM' if args.rfm else 'static'} refinement, classes per image {labels}")
    print(f"this project: {ours:.4f} s/step ({1 / ours:.2f} it/s), peak {our_peak:.0f} MB")
    print(f"authors' code: {theirs['step_s']:.4f} s/step ({1 / theirs['step_s']:.2f} it/s), "
          f"peak {theirs['peak_memory_mb']:.0f} MB")
    print(f"speed-up: {theirs['step_s'] / ours:.1f}x")


if __name__ == "__main__":
    main()
