"""The data contract and the training augmentation (METHOD.md section 1)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from weclip.dataset import (ClassInfo, EvalDataset, Record, TrainDataset, normalize,
                            random_rescale_flip_crop, read_classes, read_manifest, write_dataset)


@pytest.fixture
def dataset(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 60), i, np.uint8)).save(tmp_path / f"{i}_mask.png")
    info = ClassInfo("toy", ["cat", "dog"], ["cat", "dog"], ["grass"])
    records = [Record(str(i), tmp_path / f"{i}.png", tmp_path / f"{i}_mask.png",
                      "train" if i < 2 else "val", [1 + i % 2]) for i in range(3)]
    write_dataset(tmp_path, info, records)
    return tmp_path


def test_manifest_round_trips(dataset):
    assert read_classes(dataset).classes == ["cat", "dog"]
    records = read_manifest(dataset)
    assert [r.split for r in records] == ["train", "train", "val"]
    assert records[1].labels == [2] and records[1].image == dataset / "1.png"
    assert len(read_manifest(dataset, "val")) == 1


def test_malformed_manifest_rows_name_the_file_and_line(dataset):
    with open(dataset / "manifest.csv", "a") as f:
        f.write("x,x.png,,train,cat\n")
    with pytest.raises(ValueError, match=r"manifest.csv:5"):
        read_manifest(dataset)


def test_missing_dataset_says_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="weclip prepare"):
        read_classes(tmp_path)


def test_training_items_are_normalised_crops_with_image_level_labels(dataset):
    image, labels, index = TrainDataset(dataset, "train", crop_size=32)[1]
    assert image.shape == (3, 32, 32) and labels.tolist() == [0.0, 1.0] and index == 1


def test_eval_items_keep_the_whole_image_and_mask(dataset):
    image, raw, mask, labels, _ = EvalDataset(dataset, "val")[0]
    assert image.shape == raw.shape == (3, 40, 60) and mask.shape == (40, 60)
    assert torch.allclose(normalize(raw), image)


def test_masks_follow_their_image_through_the_augmentation():
    image = torch.full((3, 8, 8), 10.0)
    image[:, :, 5:] = 200.0
    mask = (image[0] == 200).long()
    for seed in range(4):
        crop, cropped = random_rescale_flip_crop(image, (1.0, 1.0), 12, random.Random(seed), mask)
        assert torch.equal(cropped == 1, crop[0] == 200) and torch.equal(cropped == 0, crop[0] == 10)
        assert torch.equal(cropped == 255, crop[0] == 0)  # the canvas is ignored


def test_small_images_land_on_a_zero_canvas():
    image = torch.full((3, 10, 10), 200.0)
    crop = random_rescale_flip_crop(image, (1.0, 1.0), 32, random.Random(0))
    assert crop.shape == (3, 32, 32)
    assert (crop == 200).sum() == 3 * 100 and (crop == 0).sum() == 3 * (1024 - 100)
