"""What the two pretraining commands of the embedded world share (`weclip pretrain-clip`,
`weclip pretrain-dino`): a world split in memory, seeded batches, and checkpoints that a rerun
resumes from (with the resume policy of every stage: other settings start afresh, saying so;
a damaged file is an error that names it)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.datasets.world import read_captions
from weclip.contract import read_manifest
from weclip.dataset import epoch_order
from weclip.files import torch_bytes, write_atomically
from weclip.images import load_image, load_mask

from .stage import discard_stale

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "weights.safetensors"  # what a pretraining leaves in its folder


@dataclass
class Split:
    """A world split in memory."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    masks: torch.Tensor  # uint8 [N, S, S]
    captions: list[str]  # [N]
    backgrounds: list[str]  # [N] background words
    labels: list[list[int]]  # [N] class ids present


def load_split(world_dir: str | Path, split: str, batch_size: int = 1) -> Split:
    """All images, masks and captions of a world split, which must hold a batch of
    ``batch_size``."""
    records = read_manifest(world_dir, split)
    if not records:
        raise ValueError(f"{world_dir}: no images in split {split!r}")
    if len(records) < batch_size:
        raise ValueError(f"{world_dir}: {len(records)} {split} images, fewer than a batch of "
                         f"{batch_size}")
    captions = read_captions(world_dir)
    return Split(images=torch.stack([load_image(r.image).to(torch.uint8) for r in records]),
                 masks=torch.stack([load_mask(r.mask).to(torch.uint8) for r in records]),
                 captions=[captions[r.image_id][0] for r in records],
                 backgrounds=[captions[r.image_id][1] for r in records],
                 labels=[r.labels for r in records])


def augment(images: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator,
            scale: tuple[float, float] = (0.7, 1.0), size: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random resized crop (area fraction in ``scale``, aspect 3/4..4/3) and horizontal flip.

    images: uint8 [B, 3, S, S], masks: uint8 [B, S, S] or None -> (float [B, 3, s, s] on the
    0-255 scale, long [B, s, s] or None), the masks moved with their images; s = ``size``
    (default S).
    """
    b = images.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    # Crop width and height as fractions of the image.
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([w * flip, zero, tx], 1), torch.stack([zero, h, ty], 1)], 1)
    size = size or images.shape[-1]
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    images = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    if masks is None:
        return images, None
    masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", align_corners=False)
    return images, masks[:, 0].long()


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of step ``step``'s batch: epochs are seeded permutations, the last partial batch
    of each is dropped."""
    epoch, offset = divmod(step, n // batch_size)
    return epoch_order(n, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


def resume(path: Path, settings: dict, model: torch.nn.Module, optimizer, scheduler) -> int:
    """Load the checkpoint at ``path`` when there is one of these ``settings``; return the step
    to continue from (0 without one)."""
    if not path.exists():
        return 0
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        stale = checkpoint["settings"] != settings
    except Exception as e:  # torch raises many types for files that are not its own
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it to "
                         "start afresh") from None
    if stale:
        discard_stale(path, "checkpoint")
        return 0
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    print(f"resuming from step {checkpoint['step']}", flush=True)
    return checkpoint["step"]


def save_weights(out_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """The pretrained weights as ``out_dir``/WEIGHTS_FILE, a safetensors file."""
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / WEIGHTS_FILE),
              metadata=metadata)


def finish(out_dir: Path, metrics_file: str, metrics: dict, settings: dict,
           losses: list[float]) -> dict:
    """Write the figures of what the run learned, with its settings and final loss, to
    ``out_dir``/``metrics_file`` and drop the checkpoint; returns the figures and the losses
    of this call's steps."""
    (out_dir / metrics_file).write_text(json.dumps(
        {**metrics, **settings, "final_loss": losses[-1] if losses else None}, indent=2) + "\n")
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return {**metrics, "losses": losses}


def save_checkpoint(path: Path, settings: dict, model: torch.nn.Module, optimizer, scheduler,
                    step: int) -> None:
    state = {"settings": settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step}
    write_atomically(path, torch_bytes(state))
