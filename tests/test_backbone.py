"""The frozen CLIP backbone: sizes, weights, freezing (docs/method.md, section 2)."""
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from weclip.backbone import FrozenCLIP, create_clip, resized_positional_embedding
from weclip.config import ModelConfig


@pytest.fixture
def backbone(tiny_config):
    return FrozenCLIP.from_config(tiny_config)


@pytest.mark.parametrize("size", [(320, 320), (384, 512)])
def test_positional_embeddings_follow_the_input_grid(backbone, size):
    grid = (size[0] // 16, size[1] // 16)
    pos = resized_positional_embedding(backbone.visual, grid)
    native = backbone.visual.positional_embedding
    assert pos.shape == (1 + grid[0] * grid[1], native.shape[1])
    assert torch.equal(pos[0], native[0])  # the class token's embedding is kept
    patch = native[1:].T.reshape(1, -1, *backbone.visual.grid_size)
    expected = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    assert torch.allclose(pos[1:], expected.flatten(2)[0].T)
    feats = backbone(torch.randn(1, 3, *size))
    assert feats.grid == grid
    assert feats.tokens.shape == (1, backbone.depth - 1, 1 + grid[0] * grid[1], backbone.width)
    assert feats.attn.shape == (1, backbone.depth, 1 + grid[0] * grid[1], 1 + grid[0] * grid[1])


def test_native_grid_reproduces_open_clips_own_blocks(backbone):
    images = torch.randn(2, 3, 64, 64)
    blocks = backbone.visual.transformer.resblocks
    with torch.no_grad():
        x = backbone.visual._embeds(images)
        for block in blocks[:-1]:
            x = block(x)
        feats = backbone(images)
        assert torch.allclose(feats.tokens[:, -1], x, atol=1e-5)
        assert torch.allclose(blocks[-1](feats.tokens[:, -1]), blocks[-1](x), atol=1e-5)


def test_attention_rows_are_distributions(backbone):
    attn = backbone(torch.randn(1, 3, 48, 80)).attn
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)


def test_backbone_is_frozen_and_stays_in_eval_mode(backbone):
    backbone.train()
    assert not backbone.clip.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_text_features_are_normalised_per_name(backbone):
    text = backbone.encode_text(["cat", "dog", "person with clothes,people,human"],
                                "a clean origami {}.")
    assert text.shape == (3, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_state_dict_safetensors_and_torchscript_files_load_the_same_model(tiny_arch, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(tiny_arch)
        scripted = open_clip.create_model(tiny_arch, jit=True)
    scripted.load_state_dict(model.state_dict(), strict=False)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    torch.jit.save(scripted, str(tmp_path / "archive.pt"))

    images = torch.randn(1, 3, 64, 96)
    outputs = [FrozenCLIP.from_config(ModelConfig(tiny_arch, str(tmp_path / name)))(images).tokens
               for name in ("plain.pt", "weights.safetensors", "archive.pt")]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_weights_load_offline(tiny_arch, tiny_clip_weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_clip(tiny_arch, str(tiny_clip_weights))
    assert torch.equal(model.logit_scale, torch.load(tiny_clip_weights)["logit_scale"])


def test_bad_weights_are_named(tiny_arch, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_clip(tiny_arch, str(tmp_path / "missing.pt"))
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt"):
        create_clip(tiny_arch, str(tmp_path / "wrong.pt"))
    with pytest.raises(ValueError, match="no-such-tag"):
        create_clip(tiny_arch, "no-such-tag")


def test_a_pretrained_tag_without_a_network_fails_at_once_saying_what_to_do(monkeypatch):
    import socket
    import time

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        pytest.skip("the hub answers here: the weights would be downloaded")
    except OSError:
        pass
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # as a user's machine has it
    start = time.monotonic()
    with pytest.raises(ValueError, match="^model.weights: 'openai': huggingface.co cannot be "
                                         "reached .* give a local weight file"):
        create_clip("ViT-B-16-quickgelu", "openai")
    assert time.monotonic() - start < 30
