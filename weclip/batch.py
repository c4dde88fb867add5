"""What a training step consumes: samples, batches of them, the frozen CLIP's features, and the
classes present in each image laid out for the pseudo labels.

A batch is assembled on the CPU by the data loader's workers (``Batch.collate``), pinned, and
copied to the device without blocking (``Batch.to``): everything a step needs, the labels'
layout included, is there before the step starts, so the step reads nothing back from the
device (docs/scaling.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BackboneFeatures:
    """What the frozen backbones give the rest of the model for a batch of B images on an
    h x w grid.

    tokens: [B, N-1, 1+hw, D] output tokens of the CLIP's blocks 1..N-1 (class token first)
    attn:   [B, N, 1+hw, 1+hw] head-averaged attention of the CLIP's blocks 1..N
    grid:   (h, w)
    dino:   [B, h'w', D'] the DINO's patch tokens on its grid ``dino_grid`` (WeCLIP+ only)
    """

    tokens: torch.Tensor
    attn: torch.Tensor
    grid: tuple[int, int]
    dino: torch.Tensor | None = None
    dino_grid: tuple[int, int] | None = None

    def map(self, fn) -> "BackboneFeatures":
        return BackboneFeatures(fn(self.tokens), fn(self.attn), self.grid,
                                None if self.dino is None else fn(self.dino), self.dino_grid)


@dataclass
class PresentClasses:
    """The foreground classes of each image of a batch of B, in K slots per image.

    classes: [B, K] long, the class index (0-based; segmentation id = index + 1) of each slot,
             the present classes in ascending order, then padding (0)
    valid:   [B, K] bool, False for padding
    present: [B, C] bool, the image-level labels

    K is fixed for a run (``train.max_labels``), so that the pseudo labels' path has one shape
    per crop size whatever the labels of a batch.
    """

    classes: torch.Tensor
    valid: torch.Tensor
    present: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor, slots: int | None = None) -> "PresentClasses":
        """labels: [B, C] multi-hot over the foreground classes, on the CPU; ``slots``: K (by
        default the most labels of an image of this batch)."""
        present = labels.detach().cpu() > 0
        counts = present.sum(1)
        if not (counts > 0).all():
            raise ValueError("every image needs at least one foreground class label")
        most = int(counts.max())
        slots = slots or most
        if most > slots:
            raise ValueError(f"an image has {most} class labels, more than the {slots} slots "
                             "per image (train.max_labels)")
        c = present.shape[1]
        # Present classes first, in ascending order: sort by index, absent ones pushed back.
        order = (torch.arange(c) + c * ~present).argsort(1)
        classes = F.pad(order, (0, max(0, slots - c)))[:, :slots]
        valid = torch.arange(slots) < counts[:, None]
        return cls(classes.where(valid, 0), valid, present)

    def map(self, fn) -> "PresentClasses":
        return PresentClasses(fn(self.classes), fn(self.valid), fn(self.present))

    def to(self, device) -> "PresentClasses":
        return self.map(lambda t: t.to(device, non_blocking=True))


@dataclass
class Sample:
    """One training item: image uint8 [3, S, S] (0-255), labels float [C] multi-hot, its index
    in the dataset; mask long [S, S] (fully supervised only); features of one image without the
    batch dimension (cached features only)."""

    image: torch.Tensor
    labels: torch.Tensor
    index: int
    mask: torch.Tensor | None = None
    features: BackboneFeatures | None = None


@dataclass
class Batch:
    """Samples stacked: images [B, 3, S, S] (0-255), labels [B, C] (stay on the host), index
    [B] long, their ``pairs``; masks [B, S, S] or None; features (float32) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    pairs: PresentClasses
    masks: torch.Tensor | None = None
    features: BackboneFeatures | None = None

    @classmethod
    def collate(cls, samples: list[Sample], slots: int | None = None) -> "Batch":
        """Stack ``samples``, laying their labels out in ``slots`` per image (PresentClasses)."""
        first = samples[0]
        labels = torch.stack([s.labels for s in samples])
        masks = torch.stack([s.mask for s in samples]) if first.mask is not None else None
        features = None
        if first.features is not None:
            features = BackboneFeatures(torch.stack([s.features.tokens for s in samples]).float(),
                                        torch.stack([s.features.attn for s in samples]).float(),
                                        first.features.grid)
        return cls(torch.stack([s.image for s in samples]), labels,
                   torch.tensor([s.index for s in samples]),
                   PresentClasses.from_labels(labels, slots), masks, features)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True), so that ``to`` copies asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device) -> "Batch":
        """The tensors a step uses on ``device``, copied without blocking (asynchronously from
        pinned memory); the labels and indices stay on the host."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, fn) -> "Batch":
        return Batch(fn(self.images), self.labels, self.index, self.pairs.map(fn),
                     None if self.masks is None else fn(self.masks),
                     None if self.features is None else self.features.map(fn))
