"""MS COCO 2014: a tiny fake instances json with polygons, rendered into semantic masks."""
import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.checks import BadInputError
from pipeline.datasets.coco import prepare_coco
from weclip.contract import read_classes, read_manifest

# The real COCO category ids: 1..90 with ten gaps.
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
W, H = 12, 10


def box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def fake_coco(root: Path, split: str = "train") -> Path:
    """Images 1 (person, toothbrush over it, a car crowd under it), 2 (only a dog crowd) and 3
    (no annotation) in the original layout under ``root``."""
    names = {i: f"COCO_{split}2014_{i:012d}.jpg" for i in (1, 2, 3)}
    (root / f"{split}2014").mkdir(parents=True)
    for name in names.values():
        Image.new("RGB", (W, H), (120, 80, 40)).save(root / f"{split}2014" / name)
    annotations = [  # (image, category, crowd, polygon)
        (1, 1, 0, box(0, 0, 8, 6)), (1, 90, 0, box(5, 3, 12, 10)), (1, 3, 1, box(0, 4, 4, 10)),
        (2, 18, 1, box(0, 0, 6, 6)),
    ]
    annotations = [{"id": 10 + i, "image_id": image, "category_id": category, "iscrowd": crowd,
                    "segmentation": polygon, "area": 1.0, "bbox": [0, 0, 1, 1]}
                   for i, (image, category, crowd, polygon) in enumerate(annotations)]
    data = {
        "images": [{"id": i, "file_name": n, "width": W, "height": H} for i, n in names.items()],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"category {c}", "supercategory": "thing"}
                       for c in reversed(CATEGORY_IDS)],  # any order: classes follow the ids
    }
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}2014.json"
    path.write_text(json.dumps(data))
    return path


def mask_of(root: Path, number: int) -> np.ndarray:
    return np.asarray(Image.open(root / "SegmentationClass" / "train" / f"{number:012d}.png"))


def test_categories_sorted_by_id_become_classes_and_later_annotations_paint_over(tmp_path):
    fake_coco(tmp_path)
    out = prepare_coco(tmp_path / "out", root=tmp_path, splits=("train",))
    mask = mask_of(tmp_path, 1)
    assert mask[1, 1] == 1  # person, category 1
    assert mask[4, 6] == 80  # toothbrush (category 90, the 80th) over the person
    assert mask[8, 10] == 80
    info = read_classes(out)
    assert (info.classes[0], info.classes[79]) == ("person", "toothbrush")


def test_crowds_are_ignored_under_objects_but_count_as_labels(tmp_path):
    fake_coco(tmp_path)
    out = prepare_coco(tmp_path / "out", root=tmp_path, splits=("train",))
    mask = mask_of(tmp_path, 1)
    assert mask[8, 1] == 255  # the car crowd
    assert mask[5, 1] == 1  # the person annotated before the crowd still shows
    assert set(np.unique(mask_of(tmp_path, 2))) == {0, 255}
    labels = {r.image_id: r.labels for r in read_manifest(out)}
    assert labels["COCO_train2014_000000000001"] == [1, 3, 80]
    assert labels["COCO_train2014_000000000002"] == [17]  # dog, from its crowd


def test_images_without_annotations_are_left_out(tmp_path):
    fake_coco(tmp_path)
    out = prepare_coco(tmp_path / "out", root=tmp_path, splits=("train",))
    assert [r.image_id for r in read_manifest(out)] == ["COCO_train2014_000000000001",
                                                        "COCO_train2014_000000000002"]


def test_rendering_resumes_keeping_masks_already_written(tmp_path):
    fake_coco(tmp_path)
    (tmp_path / "SegmentationClass" / "train").mkdir(parents=True)
    Image.fromarray(np.full((H, W), 5, np.uint8)).save(
        tmp_path / "SegmentationClass" / "train" / f"{1:012d}.png")
    prepare_coco(tmp_path / "out", root=tmp_path, splits=("train",))
    assert (mask_of(tmp_path, 1) == 5).all()
    assert sorted(p.name for p in (tmp_path / "SegmentationClass" / "train").iterdir()) == [
        f"{1:012d}.png", f"{2:012d}.png"]


def test_a_voc_style_copy_takes_labels_from_masks_and_can_skip_unlabelled_images(tmp_path):
    for name, value in [("COCO_val2014_000000000001", 7), ("COCO_val2014_000000000002", 0)]:
        (tmp_path / "JPEGImages" / "val").mkdir(parents=True, exist_ok=True)
        (tmp_path / "SegmentationClass" / "val").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H)).save(tmp_path / "JPEGImages" / "val" / f"{name}.jpg")
        number = name.rsplit("_", 1)[1]
        Image.fromarray(np.full((H, W), value, np.uint8)).save(
            tmp_path / "SegmentationClass" / "val" / f"{number}.png")
    with pytest.raises(BadInputError, match="000000000002.jpg: no labels"):
        prepare_coco(tmp_path / "out", root=tmp_path, splits=("val",))
    out = prepare_coco(tmp_path / "out", root=tmp_path, splits=("val",), skip_bad=True)
    assert [(r.image_id, r.labels) for r in read_manifest(out)] == [
        ("COCO_val2014_000000000001", [7])]
    with open(out / "skipped.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 2


def test_download_fetches_only_the_archives_the_splits_need(file_server, tmp_path):
    source = tmp_path / "src"
    fake_coco(source)
    archives = {}
    for name, folder in [("train2014.zip", "train2014"),
                         ("annotations_trainval2014.zip", "annotations")]:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for path in sorted((source / folder).iterdir()):
                zf.write(path, f"{folder}/{path.name}")
        archives[name] = buffer.getvalue()
    file_server.files.update({f"/{name}": data for name, data in archives.items()})
    out = prepare_coco(tmp_path / "out", download_dir=tmp_path / "dl", splits=("train",),
                       urls={name: f"{file_server.url}/{name}" for name in archives},
                       checksums={n: hashlib.md5(d).hexdigest() for n, d in archives.items()})
    assert len(read_manifest(out, "train")) == 2
    assert len(file_server.ranges) == 2


def test_an_annotation_file_without_the_80_categories_is_refused(tmp_path):
    path = fake_coco(tmp_path)
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:79]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train2014\.json: 79 categories"):
        prepare_coco(tmp_path / "out", root=tmp_path, splits=("train",))
