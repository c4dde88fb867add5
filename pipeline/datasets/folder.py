"""A user's own folder of images -> the data contract of ``weclip.dataset``.

Inputs:

* ``images``: a folder of images (sub-folders allowed).
* ``labels_csv``: a UTF-8 CSV file (a byte-order mark, as Excel's "CSV UTF-8" writes, is
  fine) with a header row and the columns
      image    the image's path relative to ``images``, e.g. ``cats/001.jpg``
      labels   its class names separated by ';', e.g. ``cat;dog`` (spaces around names ignored)
      split    optional: the image's split, e.g. ``train`` or ``val``
  ';' is the separator because it needs no quoting inside a comma-separated file.
  Only the images listed here are used.
* ``classes``: the class list, as
      .txt                 one class name per line (blank lines and '#' comments ignored)
      .yaml, .yml, .json   a list of names, a list of ``{name: ..., prompt: ...}``, or a mapping
                           name -> prompt; a class without a prompt is prompted by its name
* ``background``: background words (default: the WeCLIP VOC list).
* ``masks``: optional folder of evaluation masks, ``<image path without extension>.png``, single
  channel (0 background, c = c-th class, 255 ignored); an image without a mask file has none.
* ``val_fraction`` and ``seed``: without a split column, this fraction of the images (drawn
  with ``seed``) becomes 'val' and the rest 'train' (default: all 'train').
* ``max_pixels``: larger images are refused (data.max_pixels).

Image ids are the image paths without extension, '/' replaced by '__'.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import random
from pathlib import Path

import yaml

from weclip.contract import MAX_PIXELS, ClassInfo, Record

from .checks import write_checked_dataset
from .voc import VOC_BACKGROUND

LABEL_SEPARATOR = ";"


def prepare_folder(out_dir: str | Path, *, images: str | Path, labels_csv: str | Path,
                   classes: str | Path, background: list[str] | None = None,
                   masks: str | Path | None = None, val_fraction: float = 0.0, seed: int = 0,
                   name: str = "folder", skip_bad: bool = False, workers: int = 2,
                   max_pixels: int = MAX_PIXELS) -> Path:
    """Prepare a user's folder (see the module docstring) into ``out_dir`` (classes.json,
    manifest.csv, skipped.csv) and return ``out_dir``. ``skip_bad``: see
    checks.write_checked_dataset."""
    names, prompts = read_class_list(Path(classes))
    background = list(VOC_BACKGROUND if background is None else background)
    info = ClassInfo(name=name, classes=names, prompts=prompts, background=background)
    records, has_split = read_labels_csv(Path(labels_csv), Path(images),
                                         Path(masks) if masks else None)
    if has_split and val_fraction:
        raise ValueError(f"{labels_csv}: has a split column; give either that or val_fraction, "
                         "not both")
    if not has_split:
        _assign_splits(records, val_fraction, seed)
    return write_checked_dataset(out_dir, info, records, skip_bad=skip_bad,
                                 labels_source=str(labels_csv), workers=workers,
                                 max_pixels=max_pixels)


def read_class_list(path: Path) -> tuple[list[str], list[str]]:
    """(class names, prompts) from a .txt, .yaml/.yml or .json class list."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: class list not found") from None
    if path.suffix == ".txt":
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        entries = [(line, None) for line in lines if line]
    elif path.suffix in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot parse the class list ({e})") from None
        entries = _class_entries(data, path)
    else:
        raise ValueError(f"{path}: class list must be .txt, .yaml, .yml or .json")
    for name, prompt in entries:
        if not (isinstance(name, str) and name.strip() and LABEL_SEPARATOR not in name
                and isinstance(prompt, (str, type(None)))):
            raise ValueError(f"{path}: class {name!r} (prompt {prompt!r}): names and prompts "
                             f"must be non-empty text, names without {LABEL_SEPARATOR!r}")
    return [n.strip() for n, _ in entries], [(p or n).strip() for n, p in entries]


def _class_entries(data, path: Path) -> list[tuple]:
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        return [(e.get("name"), e.get("prompt")) if isinstance(e, dict) else (e, None)
                for e in data]
    raise ValueError(f"{path}: expected a list of classes or a mapping name -> prompt")


def read_labels_csv(path: Path, images: Path,
                    masks: Path | None) -> tuple[list[Record], bool]:
    """(records with labels as class names, whether the CSV has a split column).

    An empty split cell, or no split column, means 'train'.
    """
    try:
        # Excel's "CSV UTF-8" begins with a byte-order mark: not part of the first column's name.
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: labels CSV not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}: {e.reason}); "
                         "save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"image", "labels"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected a header "
                         "row with image, labels and optionally split")
    records = []
    for line, row in enumerate(reader, start=2):
        relative = (row["image"] or "").strip()
        if not relative:
            raise ValueError(f"{path}:{line}: empty image path")
        stem = Path(relative).with_suffix("")
        mask = masks / stem.with_suffix(".png") if masks else None
        labels = [n.strip() for n in (row["labels"] or "").split(LABEL_SEPARATOR) if n.strip()]
        split = (row.get("split") or "").strip() or "train"
        records.append(Record(stem.as_posix().replace("/", "__"), images / relative,
                              mask if mask and mask.exists() else None, split, labels))
    return records, "split" in reader.fieldnames


def _assign_splits(records: list[Record], val_fraction: float, seed: int) -> None:
    """Set the splits in place: ``val_fraction`` of the images 'val', drawn with ``seed``."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(r.image_id for r in records)
    val = set(random.Random(seed).sample(ids, round(val_fraction * len(ids))))
    for r in records:
        r.split = "val" if r.image_id in val else "train"
