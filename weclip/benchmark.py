"""Benchmark: training-step time and peak memory, and inference images/s.

    python -m weclip.benchmark --arch ViT-B-16 --batch 4 --crop 320 --device cuda

Random CLIP weights and random images with 1-3 labels each out of 20 classes: the timings do
not depend on what the weights are. A training step is forward (backbone, Grad-CAM, RFM, PAR,
decoder) + backward + optimiser step; inference is multi-scale (1.0, 0.75) + flip on one image
with its long side at ``--long-side``.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from .backbone import FrozenCLIP
from .inference import predict
from .model import WeCLIP
from .optim import build_optimizer, poly_warmup
from .training import TrainStep


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_labels(batch: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.zeros(batch, classes)
    for row in labels:
        count = int(torch.randint(1, 4, (1,), generator=generator))
        row[torch.randperm(classes, generator=generator)[:count]] = 1
    return labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--long-side", type=int, default=512)
    parser.add_argument("--infer-images", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    classes = [f"class {i}" for i in range(20)]
    model = WeCLIP(FrozenCLIP.from_config(args.arch), classes, ["ground", "sky", "wall"]).to(device)
    optimizer = build_optimizer(model)
    step = TrainStep(model, optimizer, poly_warmup(optimizer, max_iters=1000), amp=args.amp)

    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=gen).to(device)
    labels = random_labels(args.batch, len(classes), gen)
    for _ in range(args.warmup):
        step(images, labels)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps
    train_peak = peak_memory_mb(device)

    model.eval()
    image = torch.randn(1, 3, args.long_side, args.long_side * 3 // 4, generator=gen).to(device)
    predict(model, image, long_side=args.long_side)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.infer_images):
        predict(model, image, long_side=args.long_side)
    synchronize(device)
    images_per_s = args.infer_images / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {"arch": args.arch, "device": name, "batch": args.batch, "crop": args.crop,
              "amp": args.amp, "train_step_s": round(step_s, 4),
              "train_peak_memory_mb": round(train_peak, 1),
              "infer_images_per_s": round(images_per_s, 3)}
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    return result


if __name__ == "__main__":
    main()
