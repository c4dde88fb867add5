"""A user's own folder: images, a labels CSV ('cat;dog'), a class list, optional masks."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.checks import BadInputError
from pipeline.datasets.folder import prepare_folder
from pipeline.datasets.voc import VOC_BACKGROUND
from weclip.contract import read_classes, read_manifest

CLASSES_YAML = "- cat\n- {name: dog, prompt: 'dog,puppy'}\n"


def user_folder(base: Path, rows: list[str], classes: tuple[str, str] = ("classes.yaml",
                                                                         CLASSES_YAML)):
    """images/{one,two,sub/three}.jpg, labels.csv with ``rows`` and a class list."""
    (base / "images" / "sub").mkdir(parents=True)
    for name in ["one", "two", "sub/three"]:
        Image.new("RGB", (8, 6), (200, 30, 30)).save(base / "images" / f"{name}.jpg")
    (base / "labels.csv").write_text("\n".join(rows) + "\n")
    (base / classes[0]).write_text(classes[1])
    return dict(images=base / "images", labels_csv=base / "labels.csv", classes=base / classes[0])


ROWS = ["image,labels", "one.jpg,cat", "two.jpg, cat ; dog", "sub/three.jpg,dog"]


def test_labels_are_class_names_separated_by_semicolons(tmp_path):
    out = prepare_folder(tmp_path / "out", **user_folder(tmp_path, ROWS))
    assert [(r.image_id, r.split, r.labels) for r in read_manifest(out)] == [
        ("one", "train", [1]), ("two", "train", [1, 2]), ("sub__three", "train", [2])]


@pytest.mark.parametrize("classes", [
    ("classes.yaml", CLASSES_YAML),
    ("classes.json", json.dumps({"cat": None, "dog": "dog,puppy"})),
    ("classes.json", json.dumps(["cat", {"name": "dog", "prompt": "dog,puppy"}])),
])
def test_class_lists_give_names_and_optional_prompts(tmp_path, classes):
    info = read_classes(prepare_folder(tmp_path / "out", **user_folder(tmp_path, ROWS, classes)))
    assert (info.classes, info.prompts) == (["cat", "dog"], ["cat", "dog,puppy"])


def test_a_text_class_list_has_one_name_per_line_and_default_background(tmp_path):
    folder = user_folder(tmp_path, ROWS, ("classes.txt", "# pets\ncat\n\ndog\n"))
    info = read_classes(prepare_folder(tmp_path / "out", **folder))
    assert (info.classes, info.prompts) == (["cat", "dog"], ["cat", "dog"])
    assert info.background == VOC_BACKGROUND


def test_background_words_can_be_given(tmp_path):
    folder = user_folder(tmp_path, ROWS)
    out = prepare_folder(tmp_path / "out", background=["sofa", "floor"], **folder)
    assert read_classes(out).background == ["sofa", "floor"]


def test_an_unknown_class_name_is_reported_with_the_image_and_the_csv(tmp_path):
    rows = ["image,labels", "one.jpg,cat", "two.jpg,cat;zebra"]
    with pytest.raises(BadInputError, match=r"two\.jpg: unknown class 'zebra' \(labels from "
                                            r".*labels\.csv\)"):
        prepare_folder(tmp_path / "out", **user_folder(tmp_path, rows))


def test_a_missing_image_is_reported(tmp_path):
    with pytest.raises(BadInputError, match=r"gone\.jpg: image file not found"):
        prepare_folder(tmp_path / "out", **user_folder(tmp_path, ROWS + ["gone.jpg,cat"]))


def test_a_split_column_sets_the_splits(tmp_path):
    rows = ["image,labels,split", "one.jpg,cat,val", "two.jpg,dog,", "sub/three.jpg,dog,test"]
    out = prepare_folder(tmp_path / "out", **user_folder(tmp_path, rows))
    assert [r.split for r in read_manifest(out)] == ["val", "train", "test"]


def test_without_a_split_column_a_seeded_fraction_goes_to_val(tmp_path):
    folder = user_folder(tmp_path, ROWS)
    splits = [[r.split for r in read_manifest(prepare_folder(tmp_path / f"out{i}", seed=3,
                                                             val_fraction=0.34, **folder))]
              for i in range(2)]
    assert splits[0] == splits[1] and splits[0].count("val") == 1


def test_masks_are_found_by_image_path_with_png_extension(tmp_path):
    folder = user_folder(tmp_path, ROWS)
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 2:5] = 2
    Image.fromarray(mask).save(tmp_path / "masks" / "sub" / "three.png")
    out = prepare_folder(tmp_path / "out", masks=tmp_path / "masks", **folder)
    masks = {r.image_id: r.mask for r in read_manifest(out)}
    assert masks["one"] is None
    assert masks["sub__three"] == (tmp_path / "masks" / "sub" / "three.png").resolve()


def test_a_csv_without_the_needed_columns_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"labels\.csv: missing column\(s\) \['labels'\]"):
        prepare_folder(tmp_path / "out", **user_folder(tmp_path, ["image,classes", "one.jpg,cat"]))
