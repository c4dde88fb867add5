"""Confusion matrix, per-class IoU and mIoU (docs/method.md, section 7)."""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[num_classes, num_classes] long counts, rows = ground truth, columns = prediction.

    pred, target: label maps of any equal shape; target pixels equal to ``ignore_index`` (or
    outside 0..num_classes-1) are not counted.
    """
    pred, target = torch.as_tensor(pred).flatten().long(), torch.as_tensor(target).flatten().long()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, ground truth {target.numel()}")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    index = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU [C] from a confusion matrix; NaN for a class absent from both maps."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return tp / union.where(union > 0, torch.nan)


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes present in the ground truth (rows with pixels), as a fraction
    in [0, 1], as the authors' code averages (docs/method.md, section 7); a class only
    predicted lowers no mean."""
    present = confusion.sum(1) > 0
    return float(iou(confusion)[present].mean())
