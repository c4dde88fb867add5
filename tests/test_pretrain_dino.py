"""The small DINOv2 of WeCLIP+ on the world: its config, and pretraining that saves and resumes."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupted_and_resumed
from pipeline import pretrain_dino as pd
from pipeline.datasets.world import generate_world
from pipeline.pretraining import WEIGHTS_FILE
from weclip.dino import FrozenDINO, create_dino
from weclip.model_configs import TINY_DINO

TINY_RUN = dict(steps=4, batch_size=8, warmup_steps=1, prototypes=32, global_size=32,
                local_size=16, locals_=2, num_threads=1, eval_images=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, n_pretrain=16, n_train=0, n_val=4)


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    return out, pd.pretrain_dino(world, out, **TINY_RUN)


def test_config_is_a_timm_dinov2_vit_with_a_16x16_grid_at_the_worlds_size():
    dino = FrozenDINO(create_dino(TINY_DINO))
    tokens, grid = dino(torch.zeros(2, 3, 128, 128))
    assert grid == (16, 16) and tokens.shape == (2, 256, 128)
    assert dino.vit.num_prefix_tokens == 1 and len(dino.vit.blocks) == 6


def test_saved_weights_are_the_teachers_and_load_into_the_frozen_dino(run, world):
    out, result = run
    assert not (out / pd.CHECKPOINT_FILE).exists(), "the checkpoint goes once weights are written"
    state = load_file(str(out / WEIGHTS_FILE))
    untrained = create_dino(TINY_DINO).state_dict()
    assert state.keys() == untrained.keys()
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], untrained["blocks.0.attn.qkv.weight"])
    loaded = create_dino(TINY_DINO, str(out / WEIGHTS_FILE)).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert len(result["losses"]) == TINY_RUN["steps"]
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    written = json.loads((out / pd.METRICS_FILE).read_text())
    assert written["pretrained"] == json.loads(json.dumps(result["pretrained"]))
    assert written["steps"] == TINY_RUN["steps"]


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(run, world, tmp_path, monkeypatch):
    out, _ = run
    resumed, got = interrupted_and_resumed(pd, pd.pretrain_dino, world, tmp_path, 2, monkeypatch,
                                           **TINY_RUN)
    assert len(resumed["losses"]) == TINY_RUN["steps"] - 2
    expected = load_file(str(out / WEIGHTS_FILE))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


class MaskFeatures(torch.nn.Module):
    """A stand-in DINO whose patch features are what ``masks`` shows there, plus ``noise``."""

    def __init__(self, masks, noise=0.0):
        super().__init__()
        self.masks, self.noise = masks, noise

    def forward(self, images):
        labels = self.masks[:, ::8, ::8].flatten(1)
        features = torch.nn.functional.one_hot(labels, 4).float()
        return features + self.noise * torch.randn(features.shape, generator=torch.Generator().manual_seed(0)), (16, 16)


def test_knn_purity_is_1_for_features_that_name_the_class_and_near_chance_for_noise():
    masks = torch.zeros(4, 128, 128, dtype=torch.long)
    masks[:, :, 64:] = 1
    masks[:, 96:, :32] = 2  # a small class counts as much as a large one
    images = torch.zeros(4, 3, 128, 128, dtype=torch.uint8)
    exact = pd.knn_purity(MaskFeatures(masks), images, masks)
    assert exact["purity"] == 1.0
    assert exact["chance"] == pytest.approx(1 / 3)
    noise = pd.knn_purity(MaskFeatures(masks, noise=100.0), images, masks)
    assert abs(noise["purity"] - exact["chance"]) < 0.1


def test_patch_masks_hide_a_tenth_to_a_half_of_the_patches_of_about_half_the_crops():
    masks = pd.patch_masks(1000, 64, torch.Generator().manual_seed(0))
    shares = masks.float().mean(1)
    masked = shares > 0
    assert 0.4 < masked.float().mean() < 0.6
    assert shares[masked].min() > 0.02 and shares.max() < 0.7


def test_the_distillation_loss_is_least_when_the_student_predicts_the_teachers_target():
    generator = torch.Generator().manual_seed(0)
    teacher = 0.05 * torch.randn(8, 16, generator=generator, dtype=torch.float64)
    center = 0.01 * torch.randn(16, generator=generator, dtype=torch.float64)
    target = (teacher - center) / 0.04 * 0.1  # the student logits whose softmax at 0.1 is it
    best = pd.distillation(target, teacher, center)
    for _ in range(5):
        moved = target + 0.1 * torch.randn(8, 16, generator=generator, dtype=torch.float64)
        assert (best < pd.distillation(moved, teacher, center)).all()
