"""One WeCLIP training step: online pseudo labels, losses, update (METHOD.md section 6)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .losses import affinity_labels, affinity_loss, radius_mask, seg_loss


class TrainStep:
    """Forward, losses, backward and optimiser step for a batch.

    Keeps the affinity radius mask for the crop's token grid; returns detached loss tensors so
    the caller decides when to pay for a device sync.
    """

    def __init__(self, model, optimizer, scheduler=None, *, radius: int = 8,
                 affinity_weight: float = 0.1, ignore_index: int = 255, amp: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.radius, self.affinity_weight = radius, affinity_weight
        self.ignore_index, self.amp = ignore_index, amp
        self._masks = {}

    def radius_mask(self, grid: tuple[int, int], device) -> torch.Tensor:
        if grid not in self._masks:
            self._masks[grid] = radius_mask(*grid, self.radius).to(device)
        return self._masks[grid]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, refinement: str = "rfm",
                 features=None, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] normalised on the model's device; labels [B, C] (CPU is best);
        ``masks`` [B, H, W]: train on ground truth instead of pseudo labels."""
        self.model.train()
        autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(images, labels, refinement=refinement, features=features, masks=masks)
            logits = F.interpolate(out.logits.float(), size=out.pseudo.shape[-2:],
                                   mode="bilinear", align_corners=False)
            seg = seg_loss(logits, out.pseudo, self.ignore_index)
            patch = self.model.backbone.patch_size
            grid = (images.shape[-2] // patch, images.shape[-1] // patch)
            targets = affinity_labels(out.pseudo, self.radius_mask(grid, images.device), patch,
                                      self.ignore_index)
            aff = affinity_loss(out.affinity.float(), targets)
            loss = seg + self.affinity_weight * aff
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": loss.detach(), "seg_loss": seg.detach(), "aff_loss": aff.detach(),
                "pseudo": out.pseudo}
