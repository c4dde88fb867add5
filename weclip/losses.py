"""Segmentation and affinity losses on the online pseudo labels (METHOD.md section 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """0.5 x (CE over background pixels + CE over foreground pixels).

    logits: [B, C, h, w] at the labels' size; labels: [B, h, w] long. Balancing the two halves
    keeps the background, most of every image, from dominating. A half with no pixels adds 0
    (where a plain mean cross entropy would give NaN).
    """
    def mean_ce(target):
        total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        return total / (target != ignore_index).sum().clamp(min=1)

    background = labels.masked_fill(labels != 0, ignore_index)
    foreground = labels.masked_fill(labels == 0, ignore_index)
    return 0.5 * (mean_ce(background) + mean_ce(foreground))


def radius_mask(h: int, w: int, radius: int) -> torch.Tensor:
    """[hw, hw] float 0/1: 1 where two grid cells are within ``radius`` (Chebyshev distance)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = y.flatten(), x.flatten()
    near = ((y[:, None] - y[None]).abs() <= radius) & ((x[:, None] - x[None]).abs() <= radius)
    return near.float()


def affinity_labels(pseudo: torch.Tensor, mask: torch.Tensor, patch: int = 16,
                    ignore_index: int = 255) -> torch.Tensor:
    """Pairwise targets for the affinity map from pseudo labels.

    pseudo: [B, H, W] labels, resized (nearest) to the token grid (H // patch, W // patch);
    mask: [hw, hw] from ``radius_mask``. A pair is 1 where both labels agree, else 0; pairs
    outside the mask and pairs touching an ignored pixel are ``ignore_index``.
    Returns [B, hw, hw] long.
    """
    h, w = pseudo.shape[-2] // patch, pseudo.shape[-1] // patch
    small = F.interpolate(pseudo[:, None].float(), size=(h, w), mode="nearest").flatten(1).long()
    labels = (small[:, :, None] == small[:, None, :]).long()
    ignored = (small == ignore_index)
    ignored = ignored[:, :, None] | ignored[:, None, :] | (mask.to(pseudo.device) == 0)
    return labels.masked_fill(ignored, ignore_index)


def affinity_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0.5 x mean (1 - A_f) over positive pairs + 0.5 x mean A_f over negative pairs.

    pred: [B, hw, hw] in (0, 1); labels: [B, hw, hw] with 1, 0 or ignored. Each mean
    divides by (count + 1) so that an empty set contributes zero.
    """
    pos, neg = (labels == 1).to(pred.dtype), (labels == 0).to(pred.dtype)
    pos_loss = (pos * (1 - pred)).sum() / (pos.sum() + 1)
    neg_loss = (neg * pred).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss
