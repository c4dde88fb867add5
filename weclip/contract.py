"""The one data contract every dataset is prepared into: the class list and the manifest.

A prepared dataset is a folder holding

    classes.json   {"name": str, "classes": [foreground names], "prompts": [text per class],
                    "background": [background words], "ignore_index": 255}
    manifest.csv   image_id, image, mask, split, labels
                   image/mask: paths relative to the folder, or absolute; mask empty if none
                   labels: space-separated class ids in 1..C (image-level, foreground only)

Masks are single-channel PNGs: 0 is background, c is ``classes[c - 1]``, ``ignore_index`` is
unlabelled (``weclip.images`` reads and writes them). Plain Python: preparing a dataset needs
no model code.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def multi_hot(labels: list[int], num_foreground: int) -> list[float]:
    """Class ids in 1..C -> the multi-hot vector over the C foreground classes."""
    vector = [0.0] * num_foreground
    for c in labels:
        vector[c - 1] = 1.0
    return vector


def write_dataset(root: str | Path, info: ClassInfo, records: list[Record]) -> None:
    """Write ``classes.json`` and ``manifest.csv`` under ``root``, each atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(info), indent=2) + "\n"
    write_atomically(root / "classes.json", text)

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
