"""Segmentation, Dice and affinity losses on the online pseudo labels (docs/method.md, sections 6
and 10).

Each loss is a sum over pixels or pairs divided by a count. In data-parallel training a rank
sees part of the batch: ``sum_counts`` (a sum over the ranks, e.g. an all-reduce) makes the
counts those of the whole batch, so that the ranks' losses add up to the whole batch's loss.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SumCounts = Callable[[torch.Tensor], torch.Tensor]


def _summed(counts: torch.Tensor, sum_counts: SumCounts | None) -> torch.Tensor:
    return counts if sum_counts is None else sum_counts(counts)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
             sum_counts: SumCounts | None = None) -> torch.Tensor:
    """0.5 x (CE over background pixels + CE over foreground pixels).

    logits: [B, C, h, w] at the labels' size; labels: [B, h, w] long. Balancing the two halves
    keeps the background, most of every image, from dominating. A half with no pixels adds 0
    (where a plain mean cross entropy would give NaN).
    """
    halves = (labels.masked_fill(labels != 0, ignore_index),  # background
              labels.masked_fill(labels == 0, ignore_index))  # foreground
    totals = torch.stack([F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
                          for t in halves])
    counts = _summed(torch.stack([(t != ignore_index).sum() for t in halves]), sum_counts)
    # An empty half has a zero total; dividing it by 1 keeps it zero.
    return 0.5 * (totals / counts.where(counts > 0, 1)).sum()


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
               sum_counts: SumCounts | None = None) -> torch.Tensor:
    """1 - the mean over classes of 2 |P . Y| / (|P| + |Y|), P the softmax and Y the one-hot
    labels, each summed over the whole batch (WeCLIP+, docs/method.md, section 10).

    logits: [B, C, h, w] at the labels' size; labels: [B, h, w] long, ``ignore_index`` pixels
    without a one-hot (their probabilities count in |P|, as in the authors' code). A class
    absent from the batch adds 0. ``sum_counts``: the sums over the ranks' shares, the gradient
    going through this rank's.
    """
    probs = logits.softmax(1)
    classes = torch.arange(logits.shape[1], device=labels.device).view(1, -1, 1, 1)
    onehot = (labels[:, None] == classes).to(probs.dtype)
    overlap, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
    if sum_counts is not None:
        overlap = overlap + (sum_counts(overlap.detach()) - overlap.detach())
        total = total + (sum_counts(total.detach()) - total.detach())
    return 1 - (2 * overlap / (total + 1e-7)).mean()


def radius_mask(h: int, w: int, radius: int, device=None) -> torch.Tensor:
    """[hw, hw] float 0/1: 1 where two grid cells are within ``radius`` (Chebyshev distance)."""
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                          indexing="ij")
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


def affinity_loss(pred: torch.Tensor, labels: torch.Tensor,
                  sum_counts: SumCounts | None = None) -> torch.Tensor:
    """0.5 x mean (1 - A_f) over positive pairs + 0.5 x mean A_f over negative pairs.

    pred: [B, hw, hw] in (0, 1); labels: [B, hw, hw] with 1, 0 or ignored. Each mean
    divides by (count + 1) so that an empty set contributes zero.
    """
    pos, neg = (labels == 1).to(pred.dtype), (labels == 0).to(pred.dtype)
    totals = torch.stack([(pos * (1 - pred)).sum(), (neg * pred).sum()])
    counts = _summed(torch.stack([pos.sum(), neg.sum()]), sum_counts)
    return 0.5 * (totals / (counts + 1)).sum()
