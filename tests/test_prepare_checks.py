"""Every image and mask is checked once; all problems are reported together, naming each file."""
import csv

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.checks import BadInputError, check_records, write_checked_dataset
from weclip.contract import ClassInfo, Record, read_manifest

INFO = ClassInfo(name="toy", classes=["cat", "dog"], prompts=["cat", "dog"], background=["grass"])


def image(path, size=(8, 6)):
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def mask(path, values, size=(8, 6)):
    array = np.zeros(size[::-1], dtype=np.uint8)
    array.flat[: len(values)] = values
    Image.fromarray(array).save(path)
    return path


def test_good_records_pass_with_labels_as_sorted_ids(tmp_path):
    records = [Record("a", image(tmp_path / "a.jpg"), mask(tmp_path / "a.png", [2, 255]), "val",
                      ["dog", 1, "dog"])]
    good, problems = check_records(records, INFO)
    assert problems == []
    assert good[0].labels == [1, 2]


def test_labels_can_be_read_from_the_masks(tmp_path):
    records = [Record("a", image(tmp_path / "a.jpg"), mask(tmp_path / "a.png", [2, 255]), "val")]
    good, _ = check_records(records, INFO, labels_from_masks=True)
    assert good[0].labels == [2]


def test_every_problem_is_reported_in_one_error_naming_each_file(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg")
    image(tmp_path / "small.jpg", size=(4, 4))
    image(tmp_path / "rgbmask.jpg")
    Image.new("RGB", (8, 6)).save(tmp_path / "rgbmask.png")
    records = [
        Record("corrupt", tmp_path / "corrupt.jpg", None, "train", [1]),
        Record("missing", tmp_path / "missing.jpg", None, "train", [1]),
        Record("small", tmp_path / "small.jpg", mask(tmp_path / "small.png", [1]), "val", [1]),
        Record("values", image(tmp_path / "values.jpg"), mask(tmp_path / "values.png", [7]),
               "val", [1]),
        Record("rgbmask", tmp_path / "rgbmask.jpg", tmp_path / "rgbmask.png", "val", [1]),
        Record("unknown", image(tmp_path / "unknown.jpg"), None, "train", ["zebra"]),
        Record("badid", image(tmp_path / "badid.jpg"), None, "train", [3]),
        Record("nolabels", image(tmp_path / "nolabels.jpg"), None, "train", []),
    ]
    with pytest.raises(BadInputError) as error:
        write_checked_dataset(tmp_path / "out", INFO, records)
    message = str(error.value)
    for expected in [
        "corrupt.jpg: cannot decode image",
        "missing.jpg: image file not found",
        "small.png: mask is 8x6 but its image is 4x4",
        "values.png: mask holds values [7] that are neither class ids 0..2 nor the ignore index",
        "rgbmask.png: mask has 3 channels (RGB)",
        "unknown.jpg: unknown class 'zebra'",
        "badid.jpg: class id 3 outside 1..2",
        "nolabels.jpg: no labels",
    ]:
        assert expected in message
    assert message.startswith("8 problem(s)")


def test_test_split_images_need_no_labels(tmp_path):
    records = [Record("t", image(tmp_path / "t.jpg"), None, "test", [])]
    assert check_records(records, INFO)[1] == []


def test_image_ids_repeated_within_a_split_are_a_problem(tmp_path):
    records = [Record("a", image(tmp_path / "a.jpg"), None, "train", [1]),
               Record("a", image(tmp_path / "b.jpg"), None, "train", [1])]
    _, problems = check_records(records, INFO)
    assert problems == [(str(tmp_path / "b.jpg"),
                         "image_id 'a' repeats an earlier image's in split 'train'")]


def test_an_image_may_belong_to_several_splits(tmp_path):
    path = image(tmp_path / "a.jpg")
    good, problems = check_records([Record("a", path, None, "train_aug", [1]),
                                    Record("a", path, None, "train", [1])], INFO)
    assert problems == [] and [r.split for r in good] == ["train_aug", "train"]


def test_skip_bad_writes_the_good_records_and_lists_the_bad_in_skipped_csv(tmp_path):
    records = [Record("good", image(tmp_path / "good.jpg"), None, "train", [1]),
               Record("gone", tmp_path / "gone.jpg", None, "train", [1])]
    out = write_checked_dataset(tmp_path / "out", INFO, records, skip_bad=True)
    assert [r.image_id for r in read_manifest(out)] == ["good"]
    with open(out / "skipped.csv", newline="") as f:
        assert list(csv.reader(f)) == [["path", "problem"],
                                       [str(tmp_path / "gone.jpg"), "image file not found"]]


def test_nothing_already_written_is_lost_on_error(tmp_path):
    good = [Record("good", image(tmp_path / "good.jpg"), None, "train", [1])]
    out = write_checked_dataset(tmp_path / "out", INFO, good)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BadInputError):
        write_checked_dataset(out, INFO, good + [Record("gone", tmp_path / "gone.jpg", None,
                                                        "train", [1])])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_unusable_class_list_is_rejected(tmp_path):
    info = ClassInfo(name="toy", classes=["cat", "cat"], prompts=["cat"], background=[])
    records = [Record("a", image(tmp_path / "a.jpg"), None, "train", [1])]
    with pytest.raises(BadInputError, match="duplicate class names.*1 prompts for 2 classes"):
        write_checked_dataset(tmp_path / "out", info, records)
