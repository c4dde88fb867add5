"""One WeCLIP training step: online pseudo labels, losses, update (docs/method.md, section 6)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .batch import Batch
from .losses import SumCounts, affinity_labels, affinity_loss, radius_mask, seg_loss
from .profiling import phase


class TrainStep:
    """Forward, losses, backward and optimiser step for a batch.

    Keeps the affinity radius mask for the crop's token grid; returns detached loss tensors so
    that the caller decides when to pay for a device sync. ``amp``: bfloat16 autocast, the
    frozen backbone cast to bfloat16 once (its block N stays in float32 for Grad-CAM).
    In data-parallel training (the decoder wrapped in DistributedDataParallel, which averages
    gradients over the ranks) ``sum_counts`` sums the losses' counts over the ranks and
    ``ranks`` is their number: each rank's loss is then its share of the whole batch's loss
    times ``ranks``, so the averaged gradient is exactly the whole batch's.
    """

    def __init__(self, model, optimizer, scheduler=None, *, radius: int = 8,
                 affinity_weight: float = 0.1, ignore_index: int = 255, amp: bool = False,
                 sum_counts: SumCounts | None = None, ranks: int = 1):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.radius, self.affinity_weight = radius, affinity_weight
        self.ignore_index, self.amp = ignore_index, amp
        self.sum_counts, self.ranks = sum_counts, ranks
        self._masks = {}
        if amp:
            model.backbone.cast_blocks(torch.bfloat16)

    def radius_mask(self, grid: tuple[int, int], device) -> torch.Tensor:
        if grid not in self._masks:
            self._masks[grid] = radius_mask(*grid, self.radius, device=device)
        return self._masks[grid]

    def __call__(self, batch: Batch, refinement: str = "rfm") -> dict[str, torch.Tensor]:
        """One step on ``batch`` (on the model's device). Its ``masks``, when present, replace
        the pseudo labels (the fully supervised upper bound). Returns this rank's share of the
        losses ('loss', 'seg_loss', 'aff_loss') and the 'targets' [B, H, W] trained on."""
        self.model.train()
        images = batch.images
        autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(images, None if batch.masks is not None else batch.pairs,
                             refinement=refinement, features=batch.features, with_affinity=True)
            targets = batch.masks if batch.masks is not None else out.pseudo
            with phase("losses"):
                logits = F.interpolate(out.logits.float(), size=targets.shape[-2:],
                                       mode="bilinear", align_corners=False)
                seg = seg_loss(logits, targets, self.ignore_index, self.sum_counts)
                patch = self.model.backbone.patch_size
                grid = (images.shape[-2] // patch, images.shape[-1] // patch)
                pairs = affinity_labels(targets, self.radius_mask(grid, images.device), patch,
                                        self.ignore_index)
                aff = affinity_loss(out.affinity.float(), pairs, self.sum_counts)
                loss = seg + self.affinity_weight * aff
        with phase("backward + optimiser"):
            self.optimizer.zero_grad(set_to_none=True)
            (loss * self.ranks).backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        return {"loss": loss.detach(), "seg_loss": seg.detach(), "aff_loss": aff.detach(),
                "targets": targets}
