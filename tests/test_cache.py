"""The feature cache: fixed views through the frozen CLIP, written to zarr and read back."""
import re

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import fixed_view, write_cache
from pipeline.features import CachedFeatures, estimate_bytes
from weclip.backbone import FrozenCLIP
from weclip.batch import Batch
from weclip.images import load_image

SIZE = 64  # the tiny ViT's patch is 16: a 4 x 4 grid


@pytest.fixture
def backbone(tiny_model):
    return tiny_model.backbone


def count_images(monkeypatch, backbone, fail_after=None):
    """Record how many images each backbone call sees; optionally fail after some calls."""
    seen, forward = [], type(backbone).forward  # the class's: a patch may already be in place

    def counted(images):
        if fail_after is not None and len(seen) == fail_after:
            raise RuntimeError("interrupted")
        seen.append(len(images))
        return forward(backbone, images)

    monkeypatch.setattr(backbone, "forward", counted)
    return seen


def views(photos, indices):
    return torch.stack([fixed_view(load_image(photos / f"{i}.png"), SIZE) for i in indices])


def test_cached_features_equal_the_backbone_on_the_fixed_view(photos, backbone, tmp_path):
    path = write_cache(backbone, photos, "train", tmp_path / "cache.zarr", size=SIZE,
                       batch_size=2, progress=False)
    cache = CachedFeatures(path, backbone)
    batch = Batch.collate([cache[i] for i in (1, 3)])
    expected = backbone(backbone.normalize(views(photos, (1, 3))))
    assert batch.features.grid == expected.grid == (4, 4)
    assert batch.features.tokens.dtype == torch.float32
    assert torch.allclose(batch.features.tokens, expected.tokens, rtol=1e-3, atol=1e-3)
    assert torch.allclose(batch.features.attn, expected.attn, rtol=1e-3, atol=1e-4)
    assert torch.equal(batch.images, views(photos, (1, 3)))
    assert batch.labels.tolist() == [[0, 1, 0], [1, 0, 0]]


def test_the_model_on_cached_features_matches_the_online_backbone(photos, tiny_model, tmp_path):
    path = write_cache(tiny_model.backbone, photos, "train", tmp_path / "cache.zarr",
                       size=SIZE, progress=False)
    cache = CachedFeatures(path)
    batch = Batch.collate([cache[i] for i in range(len(cache))])
    tiny_model.eval()
    cached = tiny_model(batch.images, batch.labels, features=batch.features)
    online = tiny_model(batch.images, batch.labels)
    assert torch.allclose(cached.logits, online.logits, rtol=1e-3, atol=1e-3)
    assert (cached.pseudo == online.pseudo).float().mean() > 0.99


def test_an_interrupted_write_resumes_without_recomputing(photos, backbone, tmp_path,
                                                          monkeypatch):
    path = tmp_path / "cache.zarr"
    options = dict(size=SIZE, batch_size=2, shard_size=2, progress=False)
    count_images(monkeypatch, backbone, fail_after=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_cache(backbone, photos, "train", path, **options)
    assert zarr.open_group(path)["done"][:].tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError, match=re.escape(f"{path}: incomplete")):
        CachedFeatures(path)

    seen = count_images(monkeypatch, backbone)
    write_cache(backbone, photos, "train", path, **options)
    assert sum(seen) == 3  # only the unfinished rows

    reference = write_cache(backbone, photos, "train", tmp_path / "reference.zarr", **options)
    resumed, fresh = zarr.open_group(path), zarr.open_group(reference)
    for name in ("tokens", "attn", "images", "labels", "done"):
        np.testing.assert_array_equal(resumed[name][:], fresh[name][:])
    assert dict(resumed.attrs) == dict(fresh.attrs)


def test_a_cache_made_with_other_settings_is_made_afresh_with_a_warning(
        photos, backbone, tmp_path, monkeypatch, caplog):
    path = write_cache(backbone, photos, "train", tmp_path / "cache.zarr", size=SIZE,
                       progress=False)
    write_cache(backbone, photos, "train", path, size=48, progress=False)
    assert zarr.open_group(path).attrs["grid"] == [3, 3]
    assert f"{path}: feature cache made with other settings; starting afresh" in caplog.messages

    seen = count_images(monkeypatch, backbone)
    write_cache(backbone, photos, "train", path, size=48, progress=False)
    assert seen == []  # a finished, matching cache is left as it is


def test_training_refuses_a_cache_of_other_weights(photos, backbone, tmp_path, tiny_config):
    path = write_cache(backbone, photos, "train", tmp_path / "cache.zarr", size=SIZE,
                       progress=False)
    other = FrozenCLIP.from_config(tiny_config)
    with torch.no_grad():
        other.visual.proj.add_(1.0)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*other .*weights"):
        CachedFeatures(path, other)


def test_the_store_is_a_handful_of_files_of_the_estimated_size(photos, backbone, tmp_path):
    path = write_cache(backbone, photos, "train", tmp_path / "cache.zarr", size=SIZE,
                       progress=False)
    files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    # Metadata of the group and its 5 arrays, one shard each of tokens, attn and images, one
    # chunk each of labels and done.
    assert len(files) == 6 + 3 + 2, files
    group = zarr.open_group(path)
    stored = sum(group[name].nbytes for name in ("tokens", "attn", "images"))
    assert stored == estimate_bytes(backbone.depth, backbone.width, (4, 4), 5)


def test_voc_estimate():
    assert estimate_bytes(12, 768, (20, 20), 1) == 10_941_720
    assert estimate_bytes(12, 768, (20, 20), 10_582) == 115_785_281_040
