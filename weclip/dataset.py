"""The torch datasets that read a prepared dataset (``weclip.contract``): augmented training crops
with image-level labels, and whole images for evaluation.

Training reads only the image-level labels, never the masks (docs/method.md, section 1), except
for the fully supervised upper bound. Images stay on the 0-255 scale here: the model's backbone
normalises them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .batch import Sample
from .contract import multi_hot, read_classes, read_manifest
from .images import load_image, load_mask, open_rgb, open_upright


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` items in epoch ``epoch`` of a run seeded ``seed``: the same in a
    resumed or a scaled-out run."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def random_rescale_flip_crop(image: Image.Image, scale_range: tuple[float, float],
                             crop_size: int, rng: random.Random, mask: Image.Image | None = None,
                             ignore_index: int = 255):
    """The training augmentation (docs/method.md, section 1) of an RGB image -> uint8
    [3, crop, crop] (and the mask, long [crop, crop], when given).

    Rescale by a factor drawn from ``scale_range`` to the truncated size int(scale * side), with
    PIL's bilinear filter (which antialiases when shrinking), as the authors' code does; flip
    with p = 0.5; crop at random, where the image is smaller than the crop at a random offset
    on a zero canvas. A ``mask`` (fully supervised training only) follows the image (nearest,
    canvas ``ignore_index``).
    """
    scale = rng.uniform(*scale_range)
    w, h = image.size
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    layers = [(_to_tensor(image.resize(size, Image.Resampling.BILINEAR)), 0)]
    if mask is not None:
        layers.append((torch.from_numpy(np.asarray(mask.resize(size, Image.Resampling.NEAREST), np.int64)
                                        .copy())[None], ignore_index))
    flip = rng.random() < 0.5
    w, h = size
    ch, cw = max(h, crop_size), max(w, crop_size)
    top, left = rng.randint(0, ch - h), rng.randint(0, cw - w)
    y, x = rng.randint(0, ch - crop_size), rng.randint(0, cw - crop_size)
    out = []
    for layer, fill in layers:
        canvas = layer.new_full((layer.shape[0], ch, cw), fill)
        canvas[:, top:top + h, left:left + w] = layer.flip(-1) if flip else layer
        out.append(canvas[:, y:y + crop_size, x:x + crop_size])
    return out[0] if mask is None else (out[0], out[1][0])


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class TrainDataset(torch.utils.data.Dataset):
    """Augmented crops with image-level labels, as ``Sample``s (with the cropped mask when
    ``with_masks``: the fully supervised upper bound)."""

    def __init__(self, root: str | Path, split: str = "train", crop_size: int = 320,
                 scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 1,
                 with_masks: bool = False):
        self.info = read_classes(root)
        self.records = read_manifest(root, split)
        self.crop_size, self.scale_range = crop_size, tuple(scale_range)
        self.seed, self.with_masks = seed, with_masks
        self.epoch = 0
        missing = [r.image_id for r in self.records if with_masks and r.mask is None]
        if missing:
            raise ValueError(f"{root}: fully supervised training needs masks; "
                             f"{len(missing)} images of {split!r} have none, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def most_labels(self) -> int:
        """The most class labels of one image: the default slots per image of a batch."""
        return max(len(r.labels) for r in self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        # Seeded per (epoch, index) so that a resumed run sees the same crops.
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        labels = torch.tensor(multi_hot(record.labels, len(self.info.classes)))
        image = open_rgb(record.image)
        if not self.with_masks:
            return Sample(random_rescale_flip_crop(image, self.scale_range, self.crop_size, rng),
                          labels, index)
        image, mask = random_rescale_flip_crop(image, self.scale_range, self.crop_size, rng,
                                               open_upright(record.mask, "mask"),
                                               self.info.ignore_index)
        return Sample(image, labels, index, mask)


@dataclass
class EvalItem:
    """A whole image: image float [3, H, W] (0-255), mask long [H, W] or None, labels float [C]
    multi-hot, image_id."""

    image: torch.Tensor
    mask: torch.Tensor | None
    labels: torch.Tensor
    image_id: str


class EvalDataset(torch.utils.data.Dataset):
    """Whole images of a split, as ``EvalItem``s."""

    def __init__(self, root: str | Path, split: str = "val"):
        self.info = read_classes(root)
        self.records = read_manifest(root, split)

    def __len__(self) -> int:
        return len(self.records)

    def with_masks(self, limit: int | None = None) -> list[int]:
        """Indices of the first ``limit`` images (all if None) that have a mask to score."""
        return [i for i, r in enumerate(self.records) if r.mask][:limit]

    def __getitem__(self, index: int) -> EvalItem:
        record = self.records[index]
        mask = load_mask(record.mask) if record.mask else None
        return EvalItem(load_image(record.image), mask,
                        torch.tensor(multi_hot(record.labels, len(self.info.classes))),
                        record.image_id)
