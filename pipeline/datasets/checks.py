"""The one place that validates a prepared dataset, before its manifest is written.

Every image and mask is read once, in parallel, by the loaders that training and inference
use (weclip.dataset.load_image and load_mask). An image must exist, decode and have at most
``max_pixels`` pixels; a mask must exist, decode, have one channel, the image's size (both
upright, after their EXIF orientation) and only class ids or the ignore index; labels must
be known class ids or names, and not empty (except in the splits that carry no labels). All
problems are collected first; then either one BadInputError lists them all, or (``skip_bad``)
the bad records are left out and listed in ``skipped.csv``.
"""
from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

from tqdm import tqdm

from weclip.contract import MAX_PIXELS, ClassInfo, Record, write_dataset
from weclip.images import BadFileError, load_image, load_mask

log = logging.getLogger(__name__)

UNLABELLED_SPLITS = ("test",)  # splits whose images carry no labels (e.g. VOC test)

Problem = tuple[str, str]  # (file, what is wrong with it)


class BadInputError(ValueError):
    """Input files are unusable; the message lists every one with its problem."""


def check_classes(info: ClassInfo) -> None:
    """Raise BadInputError if the class list itself is unusable."""
    problems = []
    if not info.classes:
        problems.append("no classes")
    duplicates = sorted({c for c in info.classes if info.classes.count(c) > 1})
    if duplicates:
        problems.append(f"duplicate class names {duplicates}")
    if len(info.prompts) != len(info.classes):
        problems.append(f"{len(info.prompts)} prompts for {len(info.classes)} classes")
    if not info.background or not all(w.strip() for w in info.background):
        problems.append("background words must be a non-empty list of non-empty words")
    if not len(info.classes) < info.ignore_index <= 255:
        problems.append(f"ignore index {info.ignore_index} must be in {len(info.classes) + 1}..255")
    if problems:
        raise BadInputError(f"class list of dataset {info.name!r}: " + "; ".join(problems))


def check_records(records: list[Record], info: ClassInfo, *, labels_from_masks: bool = False,
                  labels_source: str | None = None, workers: int = 2,
                  max_pixels: int = MAX_PIXELS) -> tuple[list[Record], list[Problem]]:
    """Check every record once -> (good records, problems of the bad ones).

    A record's ``labels`` may hold class ids (1..C) or class names (as a user's CSV gives them),
    which are resolved to ids here. With ``labels_from_masks`` the labels are instead the
    classes present in the mask. ``labels_source`` names where the labels came from, for the
    messages. Images over ``max_pixels`` pixels are a problem. Good records are returned with
    their labels as sorted class ids.
    """
    check = partial(_check_record, info=info, labels_from_masks=labels_from_masks,
                    labels_source=labels_source, max_pixels=max_pixels)
    # Threads suffice: Pillow decodes and numpy scans with the GIL released.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(check, records), total=len(records), desc="check",
                            unit=" images"))
    good, problems = [], []
    seen = set()
    for record, record_problems in results:
        # An image may belong to several splits (VOC's train lies within train_aug).
        if (record.split, record.image_id) in seen:
            record_problems.append((str(record.image), f"image_id {record.image_id!r} repeats "
                                                       f"an earlier image's in split {record.split!r}"))
        seen.add((record.split, record.image_id))
        if record_problems:
            problems.extend(record_problems)
        else:
            good.append(record)
    return good, problems


def write_checked_dataset(out_dir: str | Path, info: ClassInfo, records: list[Record], *,
                          skip_bad: bool = False, labels_from_masks: bool = False,
                          labels_source: str | None = None, workers: int = 2,
                          max_pixels: int = MAX_PIXELS) -> Path:
    """Check ``records`` (see check_records), then write the dataset into ``out_dir``.

    Problems raise one BadInputError listing all of them, and nothing is written. With
    ``skip_bad`` the bad records are left out instead. ``skipped.csv`` (path, problem) is
    written next to the manifest either way, empty when nothing was skipped. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_classes(info)
    good, problems = check_records(records, info, labels_from_masks=labels_from_masks,
                                   labels_source=labels_source, workers=workers,
                                   max_pixels=max_pixels)
    if problems and not skip_bad:
        raise BadInputError(_report(problems) + "\nFix these files, or set skip_bad to leave "
                            "them out (they are then listed in skipped.csv).")
    if not good:
        raise BadInputError(f"{out_dir}: no usable images" + (f"; {_report(problems)}"
                                                              if problems else ""))
    if problems:
        log.warning("%d problem(s) in the input; their images are left out, see %s",
                    len(problems), out_dir / "skipped.csv")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_skipped(out_dir / "skipped.csv", problems)
    write_dataset(out_dir, info, good)
    return out_dir


def _report(problems: list[Problem]) -> str:
    lines = "\n".join(f"  {path}: {problem}" for path, problem in problems)
    return f"{len(problems)} problem(s) in the input:\n{lines}"


def _write_skipped(path: Path, problems: list[Problem]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "problem"))
        writer.writerows(problems)
    os.replace(tmp, path)


def _check_record(record: Record, info: ClassInfo, labels_from_masks: bool,
                  labels_source: str | None, max_pixels: int) -> tuple[Record, list[Problem]]:
    problems: list[Problem] = []
    shape = _check_image(record.image, max_pixels, problems)
    mask_labels = _check_mask(record.mask, shape, info, problems) if record.mask else []
    if labels_from_masks:
        labels = mask_labels
    else:
        labels = _resolve_labels(record, info, labels_source, problems)
    if not labels and not problems and record.split not in UNLABELLED_SPLITS:
        why = "its mask shows no class" if labels_from_masks else "at least one class is needed"
        problems.append((str(record.image), f"no labels ({why})"))
    return replace(record, labels=labels), problems


def _check_image(path: Path, max_pixels: int, problems: list[Problem]) -> tuple[int, int] | None:
    """The upright image's (height, width), or None after noting why it is unusable."""
    try:
        return tuple(load_image(path, max_pixels).shape[1:])
    except BadFileError as e:
        problems.append((e.path, e.problem))
        return None


def _check_mask(path: Path, image_shape: tuple[int, int] | None, info: ClassInfo,
                problems: list[Problem]) -> list[int]:
    """The foreground class ids present in the mask, or [] after noting why it is unusable."""
    try:
        mask = load_mask(path)
    except BadFileError as e:
        problems.append((e.path, e.problem))
        return []
    if image_shape is not None and mask.shape != image_shape:
        (h, w), (image_h, image_w) = mask.shape, image_shape
        problems.append((str(path), f"mask is {w}x{h} but its image is {image_w}x{image_h}"))
    foreground = len(info.classes)
    values = mask.unique().tolist()
    unknown = [v for v in values if v > foreground and v != info.ignore_index]
    if unknown:
        problems.append((str(path), f"mask holds values {unknown} that are neither class ids "
                                    f"0..{foreground} nor the ignore index {info.ignore_index}"))
        return []
    return [v for v in values if 0 < v <= foreground]


def _resolve_labels(record: Record, info: ClassInfo, labels_source: str | None,
                    problems: list[Problem]) -> list[int]:
    ids = {name: i for i, name in enumerate(info.classes, start=1)}
    where = f" (labels from {labels_source})" if labels_source else ""
    resolved = set()
    for label in record.labels:
        if isinstance(label, str):
            if label not in ids:
                problems.append((str(record.image), f"unknown class {label!r}{where}; "
                                                    f"known classes: {', '.join(info.classes)}"))
                continue
            label = ids[label]
        elif not 1 <= label <= len(info.classes):
            problems.append((str(record.image), f"class id {label} outside 1..{len(info.classes)}"
                                                f"{where}"))
            continue
        resolved.add(label)
    return sorted(resolved)
