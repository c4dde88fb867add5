"""Shared fixtures: a tiny open_clip ViT (random weights) registered as 'WeCLIP-Test-Tiny'."""
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests

import open_clip
import pytest
import torch

TINY = "WeCLIP-Test-Tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return TINY


@pytest.fixture(scope="session")
def tiny_clip_weights(tiny_arch, tmp_path_factory):
    """A plain state dict of a randomly initialised tiny CLIP, saved once."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(tiny_arch)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def tiny_model(tiny_arch, tiny_clip_weights):
    from weclip import FrozenCLIP, WeCLIP

    torch.manual_seed(0)
    backbone = FrozenCLIP.from_config(tiny_arch, str(tiny_clip_weights))
    return WeCLIP(backbone, ["cat", "dog", "car"], ["grass", "sky"])
