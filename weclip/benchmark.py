"""Benchmark of a training step and of inference: time, phases, launched ops, host syncs, memory.

Random CLIP (and, for WeCLIP+, DINOv2) weights and random images with 1-3 labels each out of
20 classes (3 slots per image): the timings do not depend on what the weights are. A training
step is the full online step: backbone, Grad-CAM, RFM refinement, PAR, decoder, losses,
backward and optimiser step.
The phases are the ``weclip.profiling.phase`` ranges of the model and the training step, timed
by torch's profiler in a separate pass (profiling slows the step a little; the headline step
time is measured without it). Launched ops and host syncs are counted over one step by
``weclip.profiling.DispatchCounter`` (eager steps only: a compiled step runs its own kernels);
on CUDA the profiler also counts the kernels a step runs. Inference is multi-scale (1.0, 0.75)
+ flip on one image with its long side at ``long_side``, before the CRF.
"""
from __future__ import annotations

import resource
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from .batch import Batch, PresentClasses
from .config import DinoConfig, ModelConfig
from .contract import ClassInfo
from .factory import create_model
from .inference import predict
from .optim import build_optimizer, poly_warmup
from .profiling import PHASES, DispatchCounter
from .training import TrainStep

MAX_LABELS = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_batch(batch: int, crop: int, classes: int, generator: torch.Generator) -> Batch:
    """Random images [B, 3, crop, crop] (0-255) with 1-3 of ``classes`` labels each, laid out
    in 3 slots per image."""
    labels = torch.zeros(batch, classes)
    for row in labels:
        count = int(torch.randint(1, MAX_LABELS + 1, (1,), generator=generator))
        row[torch.randperm(classes, generator=generator)[:count]] = 1
    images = torch.randint(0, 256, (batch, 3, crop, crop), generator=generator, dtype=torch.uint8)
    return Batch(images, labels, torch.arange(batch), PresentClasses.from_labels(labels, MAX_LABELS))


def phase_times(step: TrainStep, batch: Batch, device: torch.device, steps: int,
                **options) -> tuple[dict, float | None]:
    """Milliseconds per step (``step(batch, **options)``) spent in each phase of ``PHASES``,
    from torch's profiler; on CUDA also the GPU kernels run per step (else None)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch, **options)
        synchronize(device)
    totals = {e.key: e for e in prof.key_averages()}
    attribute = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    phases = {name: round(getattr(totals[name], attribute) / 1000 / steps, 2) if name in totals
              else 0.0 for name in PHASES}
    kernels = None
    if device.type == "cuda":
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.is_user_annotation) / steps
    return phases, kernels


def count_dispatch(step: TrainStep, batch: Batch, **options) -> DispatchCounter:
    """One step (``step(batch, **options)``) under a DispatchCounter, the model's tensors and
    the batch's as device values."""
    model = step.model
    tensors = [*model.parameters(), *model.buffers(), batch.images,
               batch.pairs.classes, batch.pairs.valid, batch.pairs.present]
    with DispatchCounter(tensors) as counter:
        step(batch, **options)
    return counter


def run_benchmark(arch: str = "ViT-B-16", *, batch: int = 4, crop: int = 320,
                  device: str | None = None, steps: int = 10, warmup: int = 2,
                  amp: bool = False, compile: bool = False, long_side: int = 512,
                  infer_images: int = 5, dino: str | None = None) -> dict:
    """Measure; returns the figures as a flat dict (``weclip benchmark`` prints them).
    ``dino``: a DINOv2 arch, for WeCLIP+ in the voc-plus recipe's settings, its steps those
    after the self-training switch."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    classes = ClassInfo("benchmark", [f"class {i}" for i in range(20)],
                        [f"class {i}" for i in range(20)], ["ground", "sky", "wall"])
    plus = dict(dino=DinoConfig(dino, None), cam_layer=-2, box_threshold=None) if dino else {}
    model = create_model(ModelConfig(arch=arch, weights=None, **plus), classes).to(device)
    optimizer = build_optimizer(model)
    losses = dict(dice_weight=1.0, cross_weight=0.1) if dino else {}
    step = TrainStep(model, optimizer, poly_warmup(optimizer, max_iters=1000), amp=amp, **losses)
    options = {"self_training": True} if dino else {}
    if compile:
        model.compile_parts()
    data = random_batch(batch, crop, len(classes.classes), gen)
    if device.type == "cuda":
        data = data.pin_memory()
    data = data.to(device)

    for _ in range(warmup):
        step(data, **options)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(data, **options)
    synchronize(device)
    step_s = (time.perf_counter() - start) / steps
    train_peak = peak_memory_mb(device)
    phases, kernels = phase_times(step, data, device, max(1, steps // 2), **options)
    counts = {}
    if not compile:
        counter = count_dispatch(step, data, **options)
        syncs = Counter({f"{phase_name}: {op}": n for (phase_name, op), n in counter.syncs.items()})
        counts = {"launches_per_step": counter.total_launches,
                  **{f"launches.{k}": counter.launches.get(k, 0) for k in (*PHASES, "other")},
                  "syncs_per_step": counter.total_syncs, **{f"syncs.{k}": v for k, v in syncs.items()}}

    model.eval()
    image = torch.randint(0, 256, (1, 3, long_side, long_side * 3 // 4), generator=gen).float()
    image = image.to(device)
    predict(model, image, long_side=long_side)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(infer_images):
        predict(model, image, long_side=long_side)
    synchronize(device)
    images_per_s = infer_images / (time.perf_counter() - start)

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    return {"arch": arch, "dino": dino, "device": name, "torch": torch.__version__, "batch": batch,
            "crop": crop, "amp": amp, "compile": compile,
            "train_step_s": round(step_s, 4), "train_iters_per_s": round(1 / step_s, 3),
            "train_peak_memory_mb": round(train_peak, 1),
            **{f"phase_ms.{k}": v for k, v in phases.items()},
            **counts, **({"cuda_kernels_per_step": kernels} if kernels is not None else {}),
            "infer_images_per_s": round(images_per_s, 3)}
