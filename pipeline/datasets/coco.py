"""MS COCO 2014 as 81-class semantic segmentation -> the data contract of ``weclip.dataset``.

Splits 'train' and 'val': the images with at least one annotation (82,081 and 40,137, as in the
reference lists). Images are referenced where they are, not copied. ``root`` holds either

* the original layout: ``train2014/``, ``val2014/`` and ``annotations/instances_{split}2014.json``
  (what ``download_dir`` downloads and extracts). Masks are rendered from the polygons and RLEs
  into ``SegmentationClass/{split}/<number>.png``: categories sorted by id become classes
  1..80; crowd regions are painted 255 (ignored) first, then objects in annotation order, a
  later one over an earlier one. Image-level labels are the categories of all annotations,
  crowd ones included. Rendering shows progress and resumes, skipping masks already written.
* or a VOC-style copy, recognised by its JPEGImages folder: ``JPEGImages/{split}/<name>.jpg``
  and ``SegmentationClass/{split}/<number>.png`` (number = the name after its last '_', the
  reference's naming). Labels are the classes in each mask, so an image whose mask shows no
  class fails the checks; ``skip_bad`` leaves such images out.
"""
from __future__ import annotations

import contextlib
import io
from functools import partial
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from weclip.contract import MAX_PIXELS, ClassInfo, Record

from .checks import write_checked_dataset
from .download import download_and_extract
from .masks import write_masks
from .voc import VOC_BACKGROUND

# The 80 categories in id order, named as in the WeCLIP reference (VOC names where they overlap).
COCO_CLASSES = [
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
# The reference's synonyms. It spells 'sknowboard'; the plain name is used instead.
COCO_PROMPTS = [
    {"person": "person with clothes,people,human", "bird": "bird avian",
     "backpack": "backpack,bag", "umbrella": "umbrella,parasol", "handbag": "handbag,purse",
     "tie": "necktie", "baseball glove": "glove", "spoon": "dessertspoon", "chair": "chair seat",
     "tvmonitor": "tvmonitor screen", "remote": "remote control",
     "hair drier": "hairdrier,blowdrier"}.get(name, name)
    for name in COCO_CLASSES
]
# 'keyboard' is a COCO class, and 'sign' would compete with 'stop sign'.
COCO_BACKGROUND = [w for w in VOC_BACKGROUND if w not in ("keyboard", "sign")]

# Archive file name -> (official URL, md5). The md5s are the ones PaddlePaddle's COCO download
# script verifies and Salesforce LAVIS lists; the annotations' one is also its S3 ETag.
ARCHIVES = {
    "train2014.zip": ("http://images.cocodataset.org/zips/train2014.zip",
                      "md5:0da8c0bd3d6becc4dcb32757491aca88"),
    "val2014.zip": ("http://images.cocodataset.org/zips/val2014.zip",
                    "md5:a3d79f5ed8d289b7a7554ce06a5782b3"),
    "annotations_trainval2014.zip": (
        "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
        "md5:0a379cfc70b0e71301e0f377548639bd"),
}
SPLITS = ("train", "val")


def coco_class_info() -> ClassInfo:
    return ClassInfo(name="coco", classes=list(COCO_CLASSES), prompts=list(COCO_PROMPTS),
                     background=list(COCO_BACKGROUND))


def prepare_coco(out_dir: str | Path, *, root: str | Path | None = None,
                 download_dir: str | Path | None = None, splits: tuple[str, ...] = SPLITS,
                 skip_bad: bool = False, workers: int = 2, max_pixels: int = MAX_PIXELS,
                 urls: dict[str, str] | None = None,
                 checksums: dict[str, str] | None = None) -> Path:
    """Prepare COCO 2014 into ``out_dir`` (classes.json, manifest.csv, skipped.csv).

    Give exactly one of ``root`` (either layout of the module docstring) or ``download_dir``
    (the archives the splits need are downloaded and extracted there; ``urls`` and
    ``checksums`` override ARCHIVES entries by file name). ``skip_bad``,
    ``max_pixels``: see checks.write_checked_dataset. Returns ``out_dir``.
    """
    if (root is None) == (download_dir is None):
        raise ValueError("prepare_coco: give exactly one of root (original or VOC-style COCO "
                         "2014 folder) or download_dir")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown COCO split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    if download_dir is not None:
        root = fetch_coco(download_dir, splits, urls=urls, checksums=checksums)
    root = Path(root)
    voc_style = (root / "JPEGImages").is_dir()
    records = []
    for split in splits:
        records += list_voc_style(root, split) if voc_style else render_split(root, split)
    return write_checked_dataset(out_dir, coco_class_info(), records, skip_bad=skip_bad,
                                 labels_from_masks=voc_style, workers=workers,
                                 max_pixels=max_pixels)


def fetch_coco(download_dir: str | Path, splits: tuple[str, ...] = SPLITS, *,
               urls: dict[str, str] | None = None,
               checksums: dict[str, str] | None = None) -> Path:
    """Download and extract the images of ``splits`` and the annotations into ``download_dir``
    (skipped once extracted) and return it."""
    for name in [f"{split}2014.zip" for split in splits] + ["annotations_trainval2014.zip"]:
        url, checksum = ARCHIVES[name]
        download_and_extract((urls or {}).get(name, url), download_dir,
                             checksum=(checksums or {}).get(name, checksum), filename=name)
    return Path(download_dir)


def render_split(root: Path, split: str) -> list[Record]:
    """Render the masks of one split of the original layout; records with labels as class ids."""
    annotations = root / "annotations" / f"instances_{split}2014.json"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations}: COCO annotations not found")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timings
        coco = COCO(str(annotations))
    category_ids = sorted(coco.getCatIds())
    if len(category_ids) != len(COCO_CLASSES):
        raise ValueError(f"{annotations}: {len(category_ids)} categories, expected the "
                         f"{len(COCO_CLASSES)} of COCO")
    class_of = {category: c for c, category in enumerate(category_ids, start=1)}
    mask_dir = root / "SegmentationClass" / split
    records, jobs = [], []
    for image_id in sorted(coco.getImgIds()):
        anns = coco.imgToAnns[image_id]
        if not anns:
            continue
        unknown = {a["category_id"] for a in anns} - class_of.keys()
        if unknown:
            raise ValueError(f"{annotations}: image {image_id} has annotations of unknown "
                             f"category ids {sorted(unknown)}")
        file_name = coco.imgs[image_id]["file_name"]
        name = Path(file_name).stem
        mask = mask_dir / f"{_number(name)}.png"
        jobs.append((mask, partial(_render, coco, image_id, class_of)))
        labels = sorted({class_of[a["category_id"]] for a in anns})
        records.append(Record(name, root / f"{split}2014" / file_name, mask, split, labels))
    write_masks(jobs, desc=f"COCO {split} masks")
    return records


def _render(coco: COCO, image_id: int, class_of: dict[int, int]) -> np.ndarray:
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    # Crowds first (a stable sort keeps annotation order otherwise), so that an object
    # annotated inside a crowd keeps its class.
    for ann in sorted(coco.imgToAnns[image_id], key=lambda a: not a.get("iscrowd", 0)):
        value = 255 if ann.get("iscrowd", 0) else class_of[ann["category_id"]]
        mask[coco.annToMask(ann) > 0] = value
    return mask


def list_voc_style(root: Path, split: str) -> list[Record]:
    """Records (labels to be read from the masks) of one split of a VOC-style COCO copy."""
    folder = root / "JPEGImages" / split
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"{folder}: no .jpg images")
    masks = root / "SegmentationClass" / split
    return [Record(p.stem, p, masks / f"{_number(p.stem)}.png", split) for p in images]


def _number(name: str) -> str:
    """'COCO_train2014_000000000009' -> '000000000009', the reference's mask names."""
    return name.rsplit("_", 1)[-1]
