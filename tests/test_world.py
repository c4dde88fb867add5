"""The synthetic world: deterministic, and its labels, masks and captions agree."""
import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.world import BACKGROUNDS, CLASSES, describe, generate_world, read_captions
from weclip.contract import read_classes, read_manifest

COUNTS = {"n_pretrain": 12, "n_train": 10, "n_val": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=3, image_size=64, **COUNTS)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_other_images(world, tmp_path):
    again = generate_world(tmp_path / "again", seed=3, image_size=64, **COUNTS)
    assert _files(again) == _files(world)
    other = generate_world(tmp_path / "other", seed=4, image_size=64, **COUNTS)
    image = "images/val/val_00000.png"
    assert (other / image).read_bytes() != (world / image).read_bytes()


def test_a_split_does_not_depend_on_the_size_of_another(world, tmp_path):
    fewer = generate_world(tmp_path / "fewer", seed=3, image_size=64, n_pretrain=2, n_train=1, n_val=8)
    for i in range(COUNTS["n_val"]):
        image = f"images/val/val_{i:05d}.png"
        assert (fewer / image).read_bytes() == (world / image).read_bytes()


def test_manifest_has_every_split_with_its_count(world):
    records = read_manifest(world)
    assert len(records) == sum(COUNTS.values())
    for split, count in (("pretrain", 12), ("train", 10), ("val", 8)):
        assert len(read_manifest(world, split)) == count


def test_labels_are_the_classes_visible_in_the_mask(world):
    info = read_classes(world)
    assert info.classes == [name for name, _ in CLASSES]
    assert info.background == [word for word, _ in BACKGROUNDS]
    for record in read_manifest(world):
        with Image.open(record.image) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
        mask = np.asarray(Image.open(record.mask))
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        ids = set(np.unique(mask).tolist())
        assert ids <= set(range(len(info.classes) + 1)), "only background and known classes"
        assert 1 <= len(record.labels) <= 3
        assert record.labels == sorted(ids - {0})


def test_captions_name_each_object_and_the_background(world):
    captions = read_captions(world)
    records = read_manifest(world)
    assert set(captions) == {r.image_id for r in records}
    for record in records:
        caption, background = captions[record.image_id]
        assert background in read_classes(world).background
        for c in record.labels:
            assert CLASSES[c - 1][0] in caption


def test_a_region_is_described_by_its_classes_and_background():
    assert describe([4, 1], "grass") == "a photo of grass with an apple and a tyre."
    assert describe([1, 2, 3], None) == "a photo of an apple, a lemon and a starfish."
    assert describe([], "sky") == "a photo of sky."
