"""params.yaml and the dataset recipes load through the typed loader."""
from pathlib import Path

import pytest

from pipeline.params import load_params, params_fingerprint

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", ["params.yaml", "params/voc.yaml", "params/coco.yaml"])
def test_shipped_params_files_load(name):
    params = load_params(ROOT / name)
    assert params.train.rfm_start == params.train.iters // 2


def test_recipes_use_the_papers_backbone_and_schedule():
    voc, coco = load_params(ROOT / "params/voc.yaml"), load_params(ROOT / "params/coco.yaml")
    assert voc.clip.arch == coco.clip.arch == "ViT-B-16-quickgelu"
    assert (voc.train.iters, voc.train.crop_size, voc.model.box_threshold) == (30000, 320, 0.4)
    assert (coco.train.iters, coco.model.box_threshold, coco.model.rfm_layers) == (80000, 0.7, 10)


def test_overrides_change_the_fingerprint_of_their_group_only():
    base, changed = load_params(ROOT / "params.yaml"), load_params(ROOT / "params.yaml", {"infer.flip": False})
    assert params_fingerprint(base, ("train",)) == params_fingerprint(changed, ("train",))
    assert params_fingerprint(base, ("infer",)) != params_fingerprint(changed, ("infer",))


def test_the_fingerprint_follows_the_clip_weight_file_contents(tmp_path):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"one")
    params = load_params(ROOT / "params.yaml", {"clip.weights": str(weights)})
    before = params_fingerprint(params, ("clip",))
    weights.write_bytes(b"two")
    assert params_fingerprint(params, ("clip",)) != before
