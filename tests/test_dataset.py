"""The data contract and the training augmentation (docs/method.md, section 1)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from weclip.batch import Batch

from weclip.contract import ClassInfo, Record, read_classes, read_manifest, write_dataset

from weclip.dataset import EvalDataset, TrainDataset, random_rescale_flip_crop


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


def test_training_items_are_raw_crops_with_image_level_labels(dataset):
    sample = TrainDataset(dataset, "train", crop_size=32)[1]
    assert sample.image.shape == (3, 32, 32) and sample.image.dtype == torch.uint8
    assert sample.labels.tolist() == [0.0, 1.0] and sample.index == 1 and sample.mask is None


def test_samples_collate_into_a_named_batch(dataset):
    data = TrainDataset(dataset, "train", crop_size=32, with_masks=True)
    batch = Batch.collate([data[0], data[1]])
    assert batch.images.shape == (2, 3, 32, 32) and batch.masks.shape == (2, 32, 32)
    assert batch.labels.shape == (2, 2) and batch.index.tolist() == [0, 1]
    assert batch.features is None


def test_eval_items_keep_the_whole_image_and_mask(dataset):
    item = EvalDataset(dataset, "val")[0]
    assert item.image.shape == (3, 40, 60) and item.mask.shape == (40, 60)
    assert item.image.max() == 100 and item.image_id == "2"


def test_training_and_evaluation_read_images_with_the_one_loader(tmp_path):
    # A 16-bit image at mid grey (128 * 257): mid grey in both, not clipped to white.
    Image.fromarray(np.full((40, 60), 128 * 257, np.uint16)).save(tmp_path / "deep.png")
    info = ClassInfo("toy", ["cat"], ["cat"], ["grass"])
    write_dataset(tmp_path, info, [Record("deep", tmp_path / "deep.png", None, "train", [1])])
    crop = TrainDataset(tmp_path, "train", crop_size=32, scale_range=(1.0, 1.0))[0].image
    assert (crop == 128).all()
    assert (EvalDataset(tmp_path, "train")[0].image == 128).all()


def _picture(array):
    return Image.fromarray(np.asarray(array, np.uint8))


def test_masks_follow_their_image_through_the_augmentation():
    image = np.full((8, 8, 3), 10)
    image[:, 5:] = 200
    mask = (image[..., 0] == 200)
    for seed in range(4):
        crop, cropped = random_rescale_flip_crop(_picture(image), (1.0, 1.0), 12,
                                                 random.Random(seed), _picture(mask))
        assert torch.equal(cropped == 1, crop[0] == 200) and torch.equal(cropped == 0, crop[0] == 10)
        assert torch.equal(cropped == 255, crop[0] == 0)  # the canvas is ignored


def test_small_images_land_on_a_zero_canvas():
    crop = random_rescale_flip_crop(_picture(np.full((10, 10, 3), 200)), (1.0, 1.0), 32,
                                    random.Random(0))
    assert crop.shape == (3, 32, 32)
    assert (crop == 200).sum() == 3 * 100 and (crop == 0).sum() == 3 * (1024 - 100)


def test_rescaling_truncates_the_size_and_antialiases_as_the_reference_does():
    stripes = np.zeros((20, 20, 3))
    stripes[:, ::2] = 255  # one-pixel stripes: averaging neighbours gives grey
    for seed in range(20):
        rng = random.Random(seed)
        scale = random.Random(seed).uniform(0.26, 0.49)
        crop = random_rescale_flip_crop(_picture(stripes), (0.26, 0.49), 20, rng)
        side = int(20 * scale)  # truncated, not rounded
        assert int((crop[0] > 0).sum(1).max()) == side
        inside = crop[0][crop[0] > 0].float()
        assert 60 < inside.mean() < 200  # antialiased grey, not sampled black or white
