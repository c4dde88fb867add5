"""The one data contract every dataset is prepared into, and the torch datasets that read it.

A prepared dataset is a folder holding

    classes.json   {"name": str, "classes": [foreground names], "prompts": [text per class],
                    "background": [background words], "ignore_index": 255}
    manifest.csv   image_id, image, mask, split, labels
                   image/mask: paths relative to the folder, or absolute; mask empty if none
                   labels: space-separated class ids in 1..C (image-level, foreground only)

Masks are single-channel PNGs: 0 is background, c is ``classes[c - 1]``, ``ignore_index`` is
unlabelled. Training reads only the image-level labels, never the masks (docs/method.md,
section 1). Images stay on the 0-255 scale here: the model's backbone normalises them.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .backbone import BackboneFeatures
from .files import write_atomically

MANIFEST_COLUMNS = ("image_id", "image", "mask", "split", "labels")

# The default largest image prepare accepts (data.max_pixels), about 7071 x 7071, already
# 600 MB as load_image's float tensor. Below Pillow's own decompression-bomb warning (89M
# pixels), so that this clearer refusal comes first.
MAX_PIXELS = 50_000_000


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


class BadFileError(ValueError):
    """An image or mask that cannot be used: the message is "<path>: <problem>"."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


def _open_upright(path: str | Path, kind: str, max_pixels: int | None = None) -> Image.Image:
    """The decoded image or mask (``kind``, for the messages) in its own mode, turned upright
    by its EXIF orientation. Images over ``max_pixels`` are refused before decoding."""
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise BadFileError(path, f"{kind} is {im.width}x{im.height} = "
                                         f"{im.width * im.height} pixels, over data.max_pixels = "
                                         f"{max_pixels}; shrink it or raise data.max_pixels")
            return ImageOps.exif_transpose(im)  # a decoded copy: the file can close
    except BadFileError:
        raise
    except FileNotFoundError:
        raise BadFileError(path, f"{kind} file not found") from None
    except Exception as e:  # Pillow raises many types for broken files
        raise BadFileError(path, f"cannot decode {kind} ({type(e).__name__}: {e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """An image of any Pillow mode -> 8-bit RGB, alpha dropped.

    Pillow converts palette, grey, alpha, CMYK, YCbCr and LAB images, but clips 16-bit, 32-bit
    and float ones to 0..255, so that most of them turn white; those are scaled first.
    16-bit by its type's range (/257: 65535 -> 255): as image viewers show a 16-bit PNG, and
    one scale for all images keeps their brightness comparable. 32-bit integer and float by
    the image's own range (min -> 0, max -> 255), as ImageJ shows them: no real image spans
    the 32-bit range, and floats have none.
    """
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) / 257).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(_stretch(np.asarray(image, np.float64)))
    return image.convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """float [H, W] -> uint8 [H, W], the finite values' min..max onto 0..255. NaN and inf
    (missing values in a float image) count as the minimum; a constant image becomes 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    scale = 255 / (high - low) if high > low else 0.0
    return ((np.where(finite, values, low) - low) * scale).round().astype(np.uint8)


def _open_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """The image file as an upright 8-bit RGB PIL image; see load_image."""
    return _to_rgb(_open_upright(path, "image", max_pixels))


def load_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """An image file, any mode Pillow reads, as float [3, H, W] on the 0-255 scale, upright
    (its EXIF orientation applied; H, W are the upright size). The one loader of prepare's
    checks, training, inference and predict.

    Raises BadFileError (a ValueError, "<path>: <problem>") for a missing or undecodable file,
    and for one over ``max_pixels`` pixels (prepare passes data.max_pixels; later stages read
    what prepare accepted, and predict leaves the limit to Pillow's decompression-bomb check).
    """
    array = np.asarray(_open_rgb(path, max_pixels), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(path: str | Path) -> torch.Tensor:
    """A single-channel label mask as long [H, W], turned upright by its own EXIF orientation.

    Annotation tools save masks upright (as the photo is shown) and without EXIF, so this is
    usually nothing; a mask that kept its photo's EXIF is turned as the photo is. The image's
    orientation is never applied to its mask. Raises BadFileError like load_image, and for a
    mask of several channels.
    """
    mask = _open_upright(path, "mask")
    bands = mask.getbands()
    if len(bands) != 1:
        raise BadFileError(path, f"mask has {len(bands)} channels ({''.join(bands)}); expected "
                                 "a single-channel PNG of class ids")
    return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


def multi_hot(labels: list[int], num_foreground: int) -> torch.Tensor:
    """Class ids in 1..C -> float [C] multi-hot over the foreground classes."""
    target = torch.zeros(num_foreground)
    target[[c - 1 for c in labels]] = 1.0
    return target


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
    """Samples stacked: images [B, 3, S, S] (0-255), labels [B, C], index [B] long; masks
    [B, S, S] or None; features (BackboneFeatures of the batch, float32) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    masks: torch.Tensor | None = None
    features: BackboneFeatures | None = None

    @classmethod
    def collate(cls, samples: list[Sample]) -> "Batch":
        first = samples[0]
        masks = torch.stack([s.mask for s in samples]) if first.mask is not None else None
        features = None
        if first.features is not None:
            features = BackboneFeatures(torch.stack([s.features.tokens for s in samples]).float(),
                                        torch.stack([s.features.attn for s in samples]).float(),
                                        first.features.grid)
        return cls(torch.stack([s.image for s in samples]), torch.stack([s.labels for s in samples]),
                   torch.tensor([s.index for s in samples]), masks, features)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True), so that ``to`` copies asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device) -> "Batch":
        """The tensors on ``device``, copied without blocking; the labels stay where they are
        (the CAM step reads them on the host)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, fn) -> "Batch":
        features = self.features and BackboneFeatures(fn(self.features.tokens),
                                                      fn(self.features.attn), self.features.grid)
        return Batch(fn(self.images), self.labels, self.index,
                     None if self.masks is None else fn(self.masks), features)


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

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        # Seeded per (epoch, index) so that a resumed run sees the same crops.
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        labels = multi_hot(record.labels, len(self.info.classes))
        image = _open_rgb(record.image)
        if not self.with_masks:
            return Sample(random_rescale_flip_crop(image, self.scale_range, self.crop_size, rng),
                          labels, index)
        image, mask = random_rescale_flip_crop(image, self.scale_range, self.crop_size, rng,
                                               _open_upright(record.mask, "mask"),
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
                        multi_hot(record.labels, len(self.info.classes)), record.image_id)
