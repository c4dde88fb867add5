"""The small CLIP: its open_clip config, and pretraining that learns, saves and resumes."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupted_and_resumed
from pipeline import pretrain_clip as pc
from pipeline import pretraining
from pipeline.datasets.world import generate_world
from pipeline.pretraining import WEIGHTS_FILE
from weclip.backbone import normalize
from weclip.contract import read_classes
from weclip.model_configs import TINY_CLIP, register_model_configs

TINY_RUN = dict(steps=10, batch_size=16, warmup_steps=2, num_threads=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, n_pretrain=32, n_train=0, n_val=8)


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    return out, pc.pretrain_clip(world, out, **TINY_RUN)


def _reload(path):
    register_model_configs()
    model = open_clip.create_model(TINY_CLIP)
    model.load_state_dict(load_file(str(path)))  # strict: every key present, none extra
    return model.eval()


def test_config_is_an_open_clip_vit_with_a_16x16_grid_and_a_class_token():
    register_model_configs()
    model = open_clip.create_model(TINY_CLIP)
    visual = model.visual
    assert isinstance(visual, open_clip.transformer.VisionTransformer)
    assert visual.grid_size == (16, 16)
    assert visual.positional_embedding.shape[0] == 16 * 16 + 1
    assert visual.pool_type == "avg"
    tokens = open_clip.get_tokenizer(TINY_CLIP)(["a photo of a red apple on grass."])
    with torch.no_grad():
        image = model.encode_image(torch.zeros(2, 3, 128, 128))
        text = model.encode_text(tokens)
    assert image.shape == (2, 128) and text.shape == (1, 128) and tokens.shape == (1, 32)


def test_pretraining_lowers_the_loss(run):
    _, result = run
    losses = result["losses"]
    assert len(losses) == TINY_RUN["steps"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_saved_weights_load_into_open_clip_and_reproduce_the_figures(run, world):
    out, result = run
    assert not (out / pc.CHECKPOINT_FILE).exists(), "the checkpoint goes once weights are written"
    model = _reload(out / WEIGHTS_FILE)
    figures = pc.zero_shot(model, open_clip.get_tokenizer(TINY_CLIP), world)
    assert figures == {k: v for k, v in result.items() if k != "losses"}
    assert 0 <= figures["mAP"] <= 1 and figures["images"] == 8


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(run, world, tmp_path, monkeypatch):
    out, _ = run
    resumed, got = interrupted_and_resumed(pc, pc.pretrain_clip, world, tmp_path, 4, monkeypatch,
                                           **TINY_RUN)
    assert len(resumed["losses"]) == TINY_RUN["steps"] - 4
    expected = load_file(str(out / WEIGHTS_FILE))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_average_precision():
    assert pc.average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    assert pc.average_precision(np.array([0.9, 0.8, 0.1]), np.array([0, 1, 1])) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_augment_is_a_function_of_the_generator_and_moves_masks_with_images():
    images = torch.randint(0, 256, (4, 3, 128, 128), dtype=torch.uint8)
    masks = torch.zeros(4, 128, 128, dtype=torch.uint8)
    masks[:, :, :64] = 1
    images[:, :, :, :64] = 0  # the masked half is black, the rest bright
    images[:, :, :, 64:] = 255
    out, out_masks = pretraining.augment(images, masks, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 128, 128) and out.dtype == torch.float32
    assert out_masks.shape == (4, 128, 128) and out_masks.dtype == torch.long
    assert out.min() >= 0 and out.max() <= 255 + 1e-3  # bilinear weights sum to 1 up to rounding
    # Away from the edge's interpolation, masked pixels stayed black and the others bright.
    assert (out[:, 0][out_masks == 1] < 128).float().mean() > 0.97
    assert (out[:, 0][out_masks == 0] > 128).float().mean() > 0.97
    again, _ = pretraining.augment(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(pretraining.augment(images, masks, torch.Generator().manual_seed(1))[1], out_masks)


def test_patch_features_average_to_open_clip_image_features():
    register_model_configs()
    model = open_clip.create_model(TINY_CLIP).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        patches, before_last, no_attn = pc.encode_patches(model.visual, images)
        keep = torch.tensor([[0, 5, 9], [1, 2, 255]])
        kept, kept_before_last, attn = pc.encode_patches(model.visual, images, keep, 4)
        assert no_attn is None
        assert patches.shape == before_last.shape == (2, 256, 128)
        assert kept.shape == kept_before_last.shape == (2, 3, 128)
        assert attn.shape == (2, 4, 4) and torch.allclose(attn.sum(-1), torch.ones(2, 4))
        assert torch.allclose(patches.mean(1), model.encode_image(images), atol=1e-5)
        assert not torch.allclose(patches, before_last, atol=1e-2)


def test_attention_loss_is_lowest_for_attention_that_stays_within_what_patches_show():
    shares = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # patches 0, 1: class 0; 2: class 1
    grouped = torch.tensor([[[0.1, 0.0, 0.0, 0.0],  # the class token's row and column do not count
                             [0.4, 0.3, 0.3, 0.0],
                             [0.0, 0.5, 0.5, 0.0],
                             [0.5, 0.0, 0.0, 0.5]]])
    uniform = torch.full((1, 4, 4), 0.25)
    assert pc.attention_loss(grouped, shares) < pc.attention_loss(uniform, shares)
    assert torch.isclose(pc.attention_loss(grouped, shares), torch.tensor(2 / 3 * 0.6931), atol=1e-3)


@pytest.mark.slow
def test_attention_supervision_makes_attention_group_patches_by_class(tmp_path, world):
    kwargs = dict(steps=12, batch_size=8, warmup_steps=2, patch_dropout=0.0, num_threads=1)
    data = pc.load_split(world, "pretrain")
    images = normalize(data.images[:8].float(), "clip")
    shares = pc.patch_shares(data.masks[:8].long(), read_classes(world).num_classes, 16)
    within = {}
    for weight in (0.0, 5.0):
        pc.pretrain_clip(world, tmp_path / str(weight), attention_weight=weight, **kwargs)
        model = _reload(tmp_path / str(weight) / WEIGHTS_FILE)
        with torch.no_grad():
            _, _, attn = pc.encode_patches(model.visual, images, attention_blocks=4)
        within[weight] = float(pc.attention_loss(attn, shares))
    assert within[5.0] < within[0.0]


def test_a_region_shows_what_covers_a_tenth_of_it():
    masks = torch.zeros(64, 128, 128, dtype=torch.long)
    masks[:, :, :32] = 2  # class 2 fills the left quarter
    shares = pc.patch_shares(masks, 4, 16)
    cells, shown = pc.sample_regions(shares, 16, torch.Generator().manual_seed(0))
    assert cells.shape == (64, 256) and shown.shape == (64, 4)
    boxes = cells.view(64, 16, 16)
    sides = boxes.any(2).sum(1), boxes.any(1).sum(1)
    assert torch.equal(boxes.sum((1, 2)), sides[0] * sides[1]), "each region is one box"
    assert all(4 <= side.min() and side.max() <= 10 for side in sides)
    left = boxes[:, :, :4].sum((1, 2)) / boxes.sum((1, 2))  # the box's share in class 2
    assert torch.equal(shown[:, 2], left >= 0.1)
    assert torch.equal(shown[:, 0], left <= 0.9)
    assert not shown[:, [1, 3]].any()


def test_region_loss_counts_every_region_of_a_caption_as_a_positive():
    text = torch.eye(2)
    regions = torch.eye(2)[[0, 0, 1]]  # regions 0 and 1 show caption 0, region 2 caption 1
    scale = torch.tensor(100.0)
    right = pc.region_loss(regions, text, torch.tensor([0, 0, 1]), scale)
    wrong = pc.region_loss(regions, text, torch.tensor([0, 1, 1]), scale)
    # Caption 0 cannot tell its two equal regions apart: log 2 of its text-to-region term, halved
    # by the mean over captions and again by the mean of both directions.
    assert right == pytest.approx(math.log(2) / 4, abs=1e-4)
    assert wrong > 10
