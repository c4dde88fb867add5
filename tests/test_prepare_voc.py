"""PASCAL VOC 2012 + SBD: a tiny fake devkit and SBD benchmark, downloaded from a local server."""
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.datasets.voc import build_segmentation_class_aug, prepare_voc
from weclip.contract import read_classes, read_manifest

SIZE = (8, 6)


def label_map(value: int, border: bool = False) -> np.ndarray:
    array = np.zeros(SIZE[::-1], dtype=np.uint8)
    array[1:4, 2:6] = value
    if border:
        array[0, :] = 255
    return array


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def fake_sources(base: Path) -> tuple[Path, Path]:
    """VOCdevkit/VOC2012 (seg train: a, val: b) and SBD (train: c, a; val: d) under ``base``.

    Image a has both a VOC mask (person, 15) and an SBD mask (cat, 8); VOC's must win.
    """
    voc = base / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    for image_id in "abcde":
        Image.new("RGB", SIZE, (90, 120, 200)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    for image_id, value in [("a", 15), ("b", 3)]:
        png = Image.fromarray(label_map(value, border=True))
        png.putpalette([0, 0, 0, 128, 0, 0] * 128)  # VOC masks are palette PNGs
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    write_lines(voc / "ImageSets" / "Segmentation" / "train.txt", ["a"])
    write_lines(voc / "ImageSets" / "Segmentation" / "val.txt", ["b"])
    sbd = base / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for image_id, value in [("a", 8), ("c", 12), ("d", 20)]:
        scipy.io.savemat(sbd / "cls" / f"{image_id}.mat",
                         {"GTcls": {"Segmentation": label_map(value), "CategoriesPresent": value}})
    write_lines(sbd / "train.txt", ["c", "a"])
    write_lines(sbd / "val.txt", ["d"])
    return voc, sbd


def tar_of(folder: Path, mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


def labels_by_split(out: Path) -> dict[str, dict[str, list[int]]]:
    by_split = {}
    for r in read_manifest(out):
        by_split.setdefault(r.split, {})[r.image_id] = r.labels
    return by_split


def test_download_builds_segmentation_class_aug_and_the_splits(file_server, tmp_path):
    fake_sources(tmp_path / "src")
    archives = {"VOCtrainval_11-May-2012.tar": tar_of(tmp_path / "src" / "VOCdevkit", "w"),
                "benchmark.tgz": tar_of(tmp_path / "src" / "benchmark_RELEASE", "w:gz")}
    file_server.files.update({f"/{name}": data for name, data in archives.items()})
    out = prepare_voc(tmp_path / "out", download_dir=tmp_path / "dl",
                      urls={name: f"{file_server.url}/{name}" for name in archives},
                      checksums={name: hashlib.md5(d).hexdigest() for name, d in archives.items()})

    assert labels_by_split(out) == {"train_aug": {"a": [15], "c": [12], "d": [20]},
                                    "train": {"a": [15]}, "val": {"b": [3]}}
    aug = tmp_path / "dl" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    assert (np.asarray(Image.open(aug / "a.png")) == label_map(15, border=True)).all()
    assert Image.open(aug / "c.png").mode == "P"  # class ids, coloured by the VOC palette
    record = read_manifest(out, "val")[0]
    assert record.image == (tmp_path / "dl/VOCdevkit/VOC2012/JPEGImages/b.jpg").resolve()


def test_class_names_prompts_and_background_are_the_reference_ones(tmp_path):
    voc, sbd = fake_sources(tmp_path)
    build_segmentation_class_aug(voc, sbd)
    info = read_classes(prepare_voc(tmp_path / "out", root=voc))
    assert len(info.classes) == 20 and info.classes[14] == "person"
    assert info.prompts[14] == "person with clothes,people,human"
    assert [p for c, p in zip(info.classes, info.prompts) if c != p] == [
        "bird avian", "chair seat", "person with clothes,people,human", "tvmonitor screen"]
    assert len(info.background) == 25 and info.background[-1] == "sign"


def test_an_existing_devkit_gives_a_test_split_without_masks_or_labels(tmp_path):
    voc, sbd = fake_sources(tmp_path)
    build_segmentation_class_aug(voc, sbd)
    write_lines(voc / "ImageSets" / "Segmentation" / "test.txt", ["e"])
    out = prepare_voc(tmp_path / "out", root=voc)
    [test] = read_manifest(out, "test")
    assert (test.image_id, test.mask, test.labels) == ("e", None, [])


def test_building_segmentation_class_aug_keeps_masks_already_written(tmp_path):
    voc, sbd = fake_sources(tmp_path)
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    Image.fromarray(label_map(1)).save(aug / "c.png")
    build_segmentation_class_aug(voc, sbd)
    assert np.asarray(Image.open(aug / "c.png")).max() == 1
    assert sorted(p.name for p in aug.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


def test_a_devkit_without_segmentation_class_aug_is_refused(tmp_path):
    voc, _ = fake_sources(tmp_path)
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug: not found"):
        prepare_voc(tmp_path / "out", root=voc)


def test_exactly_one_source_must_be_given(tmp_path):
    with pytest.raises(ValueError, match="exactly one of root"):
        prepare_voc(tmp_path / "out")
