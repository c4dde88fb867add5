"""open_clip model configs shipped with WeCLIP.

``ViT-Tiny-8-128``: the small CLIP that ``pipeline/pretrain_clip.py`` pretrains on the synthetic
world. Vision tower: 128 px, patch 8 (a 16 x 16 token grid plus the class token), width 128,
6 layers; the pooled embedding is ln_post -> mean over patch tokens -> proj, the same path the
Grad-CAM head takes. Text tower: context 32, width 128, 3 layers.
"""
from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent
TINY_CLIP = "ViT-Tiny-8-128"


def register_model_configs() -> None:
    """Make the configs of this folder known to ``open_clip.create_model`` (idempotent)."""
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
