"""One WeCLIP (or WeCLIP+) training step: online pseudo labels, losses, update (docs/method.md,
sections 6 and 10)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .batch import Batch
from .losses import SumCounts, affinity_labels, affinity_loss, dice_loss, radius_mask, seg_loss
from .profiling import phase


class TrainStep:
    """Forward, losses, backward and optimiser step for a batch.

    Keeps the affinity radius mask for the crop's token grid; returns detached loss tensors so
    that the caller decides when to pay for a device sync. ``amp``: bfloat16 autocast, the
    frozen backbones cast to bfloat16 once (the CLIP's block N stays in float32 for Grad-CAM).
    WeCLIP+ adds ``dice_weight`` x a Dice loss on the prediction and ``cross_weight`` x each
    branch's loss on the other's argmax; with ``self_training``, the prediction replaces the
    pseudo labels where its confidence is over ``confidence`` (docs/method.md, section 10).
    In data-parallel training (the decoder wrapped in DistributedDataParallel, which averages
    gradients over the ranks) ``sum_counts`` sums the losses' counts over the ranks and
    ``ranks`` is their number: each rank's loss is then its share of the whole batch's loss
    times ``ranks``, so the averaged gradient is exactly the whole batch's.
    """

    def __init__(self, model, optimizer, scheduler=None, *, radius: int = 8,
                 affinity_weight: float = 0.1, dice_weight: float = 0.0,
                 cross_weight: float = 0.0, confidence: float = 0.75, ignore_index: int = 255,
                 amp: bool = False, sum_counts: SumCounts | None = None, ranks: int = 1):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.radius, self.affinity_weight = radius, affinity_weight
        self.dice_weight, self.cross_weight, self.confidence = dice_weight, cross_weight, confidence
        self.ignore_index, self.amp = ignore_index, amp
        self.sum_counts, self.ranks = sum_counts, ranks
        self._masks = {}
        if amp:
            model.backbone.cast_blocks(torch.bfloat16)
            if model.config.dino:
                model.dino.cast(torch.bfloat16)

    def radius_mask(self, grid: tuple[int, int], device) -> torch.Tensor:
        if grid not in self._masks:
            self._masks[grid] = radius_mask(*grid, self.radius, device=device)
        return self._masks[grid]

    def __call__(self, batch: Batch, refinement: str = "rfm",
                 self_training: bool = False) -> dict[str, torch.Tensor]:
        """One step on ``batch`` (on the model's device). Its ``masks``, when present, replace
        the pseudo labels (the fully supervised upper bound). Returns this rank's share of the
        losses ('loss'; 'seg_loss', the segmentation terms; 'aff_loss') and the 'targets'
        [B, H, W] the affinity was trained on."""
        self.model.train()
        images = batch.images
        autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(images, None if batch.masks is not None else batch.pairs,
                             refinement=refinement, features=batch.features, with_affinity=True)
            targets = batch.masks if batch.masks is not None else out.pseudo
            with phase("losses"):
                logits = self._upsampled(out.logits, targets)
                seg_targets = targets
                if self_training:  # confident predictions replace the pseudo labels
                    confidence, predicted = logits.detach().softmax(1).max(1)
                    seg_targets = torch.where(confidence > self.confidence, predicted, targets)
                seg = seg_loss(logits, seg_targets, self.ignore_index, self.sum_counts)
                if self.dice_weight:
                    dice = dice_loss(logits, seg_targets, self.ignore_index, self.sum_counts)
                    # Its share: the whole batch's value over the ranks, this rank's gradient.
                    seg = seg + self.dice_weight * (dice - (1 - 1 / self.ranks) * dice.detach())
                if self.cross_weight and out.branches is not None:
                    clip, dino = (self._upsampled(b, targets) for b in out.branches)
                    seg = seg + self.cross_weight * (
                        seg_loss(clip, dino.detach().argmax(1), self.ignore_index, self.sum_counts)
                        + seg_loss(dino, clip.detach().argmax(1), self.ignore_index,
                                   self.sum_counts))
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

    @staticmethod
    def _upsampled(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear",
                             align_corners=False)
