"""The one data contract every dataset is prepared into, and the torch datasets that read it.

A prepared dataset is a folder holding

    classes.json   {"name": str, "classes": [foreground names], "prompts": [text per class],
                    "background": [background words], "ignore_index": 255}
    manifest.csv   image_id, image, mask, split, labels
                   image/mask: paths relative to the folder, or absolute; mask empty if none
                   labels: space-separated class ids in 1..C (image-level, foreground only)

Masks are single-channel PNGs: 0 is background, c is ``classes[c - 1]``, ``ignore_index`` is
unlabelled. Training reads only the image-level labels, never the masks (METHOD.md section 1).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import write_atomically

MANIFEST_COLUMNS = ("image_id", "image", "mask", "split", "labels")

# Pixel statistics on the 0-255 scale (METHOD.md section 1).
NORMALIZATION = {
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "clip": ((122.771, 116.746, 104.094), (68.501, 66.632, 70.323)),
}


@dataclass
class ClassInfo:
    """Foreground classes (ids 1..C), their text prompts and the background words."""

    name: str
    classes: list[str]
    prompts: list[str]
    background: list[str]
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        """Segmentation classes, background included (C + 1)."""
        return len(self.classes) + 1


@dataclass
class Record:
    """One image of the manifest. ``labels`` are class ids in 1..C."""

    image_id: str
    image: Path
    mask: Path | None
    split: str
    labels: list[int] = field(default_factory=list)


def write_dataset(root: str | Path, info: ClassInfo, records: list[Record]) -> None:
    """Write ``classes.json`` and ``manifest.csv`` under ``root``, each atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(info), indent=2) + "\n"
    write_atomically(root / "classes.json", lambda tmp: tmp.write_text(text))

    def write_manifest(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MANIFEST_COLUMNS)
            for r in records:
                writer.writerow([r.image_id, _relative(r.image, root),
                                 _relative(r.mask, root) if r.mask else "", r.split,
                                 " ".join(str(c) for c in r.labels)])

    write_atomically(root / "manifest.csv", write_manifest)


def _relative(path: Path, root: Path) -> str:
    path = Path(path)
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def read_classes(root: str | Path) -> ClassInfo:
    path = Path(root) / "classes.json"
    try:
        return ClassInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no prepared dataset here (run `weclip prepare`)") from None
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid class list ({e})") from None


def read_manifest(root: str | Path, split: str | None = None) -> list[Record]:
    """Records of ``root``/manifest.csv, optionally only those of one split."""
    root = Path(root)
    path = root / "manifest.csv"
    records = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                record = Record(
                    image_id=row["image_id"],
                    image=root / row["image"],
                    mask=root / row["mask"] if row["mask"] else None,
                    split=row["split"],
                    labels=[int(c) for c in row["labels"].split()],
                )
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}:{line}: malformed manifest row ({e})") from None
            if split is None or record.split == split:
                records.append(record)
    return records


def load_image(path: str | Path) -> torch.Tensor:
    """An RGB image as float [3, H, W] on the 0-255 scale."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(path: str | Path) -> torch.Tensor:
    """A label mask as long [H, W]."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im, dtype=np.int64).copy())


def normalize(images: torch.Tensor, stats: str = "imagenet") -> torch.Tensor:
    """[..., 3, H, W] on the 0-255 scale -> normalised with the named mean and std."""
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(3, 1, 1)
                 for v in NORMALIZATION[stats])
    return (images - mean) / std


def multi_hot(labels: list[int], num_foreground: int) -> torch.Tensor:
    """Class ids in 1..C -> float [C] multi-hot over the foreground classes."""
    target = torch.zeros(num_foreground)
    target[[c - 1 for c in labels]] = 1.0
    return target


def random_rescale_flip_crop(image: torch.Tensor, scale_range: tuple[float, float],
                             crop_size: int, rng: random.Random, mask: torch.Tensor | None = None,
                             ignore_index: int = 255):
    """METHOD.md section 1 augmentation of a [3, H, W] 0-255 image -> [3, crop, crop].

    Rescale by a factor drawn from ``scale_range`` (bilinear), flip with p = 0.5, then a random
    crop; where the image is smaller than the crop it lands at a random offset on a zero canvas.
    A ``mask`` [H, W] (fully supervised training only) follows the image (nearest, canvas
    ``ignore_index``) and is returned with it.
    """
    scale = rng.uniform(*scale_range)
    h, w = image.shape[-2:]
    size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    layers = [(image, 0)]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0].long()
        layers.append((mask, ignore_index))
    flip = rng.random() < 0.5
    h, w = size
    ch, cw = max(h, crop_size), max(w, crop_size)
    top, left = rng.randint(0, ch - h), rng.randint(0, cw - w)
    y, x = rng.randint(0, ch - crop_size), rng.randint(0, cw - crop_size)
    out = []
    for layer, fill in layers:
        canvas = layer.new_full((layer.shape[0], ch, cw), fill)
        canvas[:, top:top + h, left:left + w] = layer.flip(-1) if flip else layer
        out.append(canvas[:, y:y + crop_size, x:x + crop_size])
    return out[0] if mask is None else (out[0], out[1][0])


class TrainDataset(torch.utils.data.Dataset):
    """Augmented crops with image-level labels: (image [3, crop, crop] normalised, labels [C], index).

    With ``with_masks`` (the fully supervised upper bound) items are (image, labels, mask
    [crop, crop]), the mask cropped with the image.
    """

    def __init__(self, root: str | Path, split: str = "train", crop_size: int = 320,
                 scale_range: tuple[float, float] = (0.5, 2.0), normalization: str = "imagenet",
                 seed: int = 1, with_masks: bool = False):
        self.info = read_classes(root)
        self.records = read_manifest(root, split)
        self.crop_size, self.scale_range = crop_size, tuple(scale_range)
        self.normalization, self.seed, self.with_masks = normalization, seed, with_masks
        self.epoch = 0
        missing = [r.image_id for r in self.records if with_masks and r.mask is None]
        if missing:
            raise ValueError(f"{root}: fully supervised training needs masks; "
                             f"{len(missing)} images of {split!r} have none, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        # Seeded per (epoch, index) so that a resumed run sees the same crops.
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        labels = multi_hot(record.labels, len(self.info.classes))
        if self.with_masks:
            image, mask = random_rescale_flip_crop(
                load_image(record.image), self.scale_range, self.crop_size, rng,
                load_mask(record.mask), self.info.ignore_index)
            return normalize(image, self.normalization), labels, mask
        image = random_rescale_flip_crop(load_image(record.image), self.scale_range,
                                         self.crop_size, rng)
        return normalize(image, self.normalization), labels, index


class EvalDataset(torch.utils.data.Dataset):
    """Whole images: (image [3, H, W] normalised, image [3, H, W] 0-255, mask [H, W] or None, labels [C], index)."""

    def __init__(self, root: str | Path, split: str = "val", normalization: str = "imagenet"):
        self.info = read_classes(root)
        self.records = read_manifest(root, split)
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.records)

    def with_masks(self, limit: int | None = None) -> list[int]:
        """Indices of the first ``limit`` images (all if None) that have a mask to score."""
        return [i for i, r in enumerate(self.records) if r.mask][:limit]

    def __getitem__(self, index: int):
        record = self.records[index]
        raw = load_image(record.image)
        mask = load_mask(record.mask) if record.mask else None
        labels = multi_hot(record.labels, len(self.info.classes))
        return normalize(raw, self.normalization), raw, mask, labels, index
