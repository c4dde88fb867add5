"""PASCAL VOC 2012 with the SBD augmented masks -> the data contract of ``weclip.dataset``.

Splits: 'train_aug' (10,582 images: SBD train + val and VOC train, minus VOC val), 'train'
(1,464, VOC ``ImageSets/Segmentation/train.txt`` with VOC's fine masks, all also in train_aug:
where the paper scores its pseudo labels), 'val' (1,449, VOC ``ImageSets/Segmentation/val.txt``)
and 'test' (1,456, only when VOC2012test was extracted into the devkit; no masks, no labels).
Image-level labels are the classes in each mask.
Images and masks are referenced where they are, not copied.

Two ways in:

* ``download_dir``: the VOC 2012 trainval tar and the SBD benchmark are downloaded there (or
  found there), extracted, and ``VOCdevkit/VOC2012/SegmentationClassAug`` is built: VOC's own
  mask where VOC has one, else the SBD mask (``cls/<id>.mat``) converted to PNG.
* ``root``: an existing ``VOCdevkit/VOC2012`` that already has ``SegmentationClassAug``.

Either way 'train_aug' is every mask of SegmentationClassAug whose image is not in 'val'.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from weclip.contract import MAX_PIXELS, ClassInfo, Record

from .checks import write_checked_dataset
from .download import download_and_extract
from .masks import write_masks

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
# The WeCLIP reference's synonyms: a few words more where the bare name is ambiguous to CLIP.
VOC_PROMPTS = [
    {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
     "tvmonitor": "tvmonitor screen"}.get(name, name)
    for name in VOC_CLASSES
]
VOC_BACKGROUND = [
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
]

# Archive file name -> (official URL, checksum).
ARCHIVES = {
    "VOCtrainval_11-May-2012.tar": (
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "md5:6cd6e144f989b92b3379bac3b3de84fd"),
    "benchmark.tgz": (
        "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
        "benchmark.tgz",
        "md5:82b4d87ceb2ed10f6038a1cba92111cb"),
}
SPLITS = ("train_aug", "train", "val", "test")


def voc_class_info() -> ClassInfo:
    return ClassInfo(name="voc", classes=list(VOC_CLASSES), prompts=list(VOC_PROMPTS),
                     background=list(VOC_BACKGROUND))


def prepare_voc(out_dir: str | Path, *, root: str | Path | None = None,
                download_dir: str | Path | None = None, splits: tuple[str, ...] = SPLITS,
                skip_bad: bool = False, workers: int = 2, max_pixels: int = MAX_PIXELS,
                urls: dict[str, str] | None = None,
                checksums: dict[str, str] | None = None) -> Path:
    """Prepare VOC 2012 (+ SBD) into ``out_dir`` (classes.json, manifest.csv, skipped.csv).

    Give exactly one of ``root`` (a ``VOCdevkit/VOC2012`` with SegmentationClassAug) or
    ``download_dir`` (where the archives are downloaded and extracted, see fetch_voc; ``urls``
    and ``checksums`` override ARCHIVES entries by file name, e.g. for a mirror). 'test' is
    left out when the devkit has no test list. ``skip_bad``, ``max_pixels``: see checks.write_checked_dataset.
    Returns ``out_dir``.
    """
    if (root is None) == (download_dir is None):
        raise ValueError("prepare_voc: give exactly one of root (an existing VOCdevkit/VOC2012 "
                         "with SegmentationClassAug) or download_dir")
    if download_dir is not None:
        root = fetch_voc(download_dir, urls=urls, checksums=checksums)
    records = list_voc(Path(root), splits)
    return write_checked_dataset(out_dir, voc_class_info(), records, skip_bad=skip_bad,
                                 labels_from_masks=True, workers=workers,
                                 max_pixels=max_pixels)


def fetch_voc(download_dir: str | Path, *, urls: dict[str, str] | None = None,
              checksums: dict[str, str] | None = None) -> Path:
    """Download and extract VOC 2012 trainval and SBD into ``download_dir``, build
    SegmentationClassAug, and return the ``VOCdevkit/VOC2012`` folder. Resumable throughout."""
    download_dir = Path(download_dir)
    for name, (url, checksum) in ARCHIVES.items():
        download_and_extract((urls or {}).get(name, url), download_dir,
                             checksum=(checksums or {}).get(name, checksum), filename=name)
    root = download_dir / "VOCdevkit" / "VOC2012"
    build_segmentation_class_aug(root, download_dir / "benchmark_RELEASE" / "dataset")
    return root


def build_segmentation_class_aug(root: Path, sbd: Path) -> Path:
    """Write ``root``/SegmentationClassAug/<id>.png for every image of VOC's segmentation
    train/val lists and SBD's train/val lists (``sbd`` holds SBD's cls/, train.txt, val.txt).

    VOC's own mask is preferred where it exists (finer, with ignore borders); the others are
    SBD masks converted from ``cls/<id>.mat`` (GTcls.Segmentation). Existing PNGs are kept.
    """
    lists = [root / "ImageSets" / "Segmentation" / "train.txt",
             root / "ImageSets" / "Segmentation" / "val.txt", sbd / "train.txt", sbd / "val.txt"]
    ids = sorted({i for path in lists for i in read_ids(path)})
    out = root / "SegmentationClassAug"
    jobs = []
    for image_id in ids:
        voc_mask = root / "SegmentationClass" / f"{image_id}.png"
        source = voc_mask if voc_mask.exists() else sbd / "cls" / f"{image_id}.mat"
        jobs.append((out / f"{image_id}.png", partial(_load_mask, source)))
    write_masks(jobs, desc="SegmentationClassAug")
    return out


def _load_mask(path: Path) -> np.ndarray:
    """Class ids [H, W] of a VOC palette PNG (its palette indices are the ids) or an SBD .mat."""
    try:
        if path.suffix == ".mat":
            mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
            return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)
        with Image.open(path) as im:
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # scipy and Pillow raise many types for broken files
        raise ValueError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None


def read_ids(path: Path) -> list[str]:
    """Image ids of a split list, one per line."""
    try:
        return path.read_text().split()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: split list not found") from None


def list_voc(root: Path, splits: tuple[str, ...] = SPLITS) -> list[Record]:
    """Records of the requested splits of a ``VOCdevkit/VOC2012`` with SegmentationClassAug."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown VOC split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    aug = root / "SegmentationClassAug"
    if not aug.is_dir():
        raise FileNotFoundError(f"{aug}: not found; prepare from download_dir to build it, or "
                                "point root at a VOC2012 folder that has it")
    image = root / "JPEGImages"
    val = read_ids(root / "ImageSets" / "Segmentation" / "val.txt")
    records = []
    for split in splits:
        if split == "test":
            test_list = root / "ImageSets" / "Segmentation" / "test.txt"
            if not test_list.exists():
                log.info("VOC: %s not found, no 'test' split", test_list)
                continue
            records += [Record(i, image / f"{i}.jpg", None, "test") for i in read_ids(test_list)]
            continue
        if split == "val":
            ids = val
        elif split == "train":
            ids = read_ids(root / "ImageSets" / "Segmentation" / "train.txt")
        else:
            ids = sorted({p.stem for p in aug.glob("*.png")} - set(val))
        records += [Record(i, image / f"{i}.jpg", aug / f"{i}.png", split) for i in ids]
    return records
