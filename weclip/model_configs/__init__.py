"""The small models of the embedded world: an open_clip config and a timm DINOv2 config.

``ViT-Tiny-8-128``: the small CLIP that ``pipeline/pretrain_clip.py`` pretrains on the synthetic
world. Vision tower: 128 px, patch 8 (a 16 x 16 token grid plus the class token), width 128,
6 layers; the pooled embedding is ln_post -> mean over patch tokens -> proj, the same path the
Grad-CAM head takes. Text tower: context 32, width 128, 3 layers.

``vit_tiny_patch8_dinov2_world``: the small self-supervised ViT that ``pipeline/pretrain_dino.py``
pretrains for WeCLIP+ on the world: timm's DINOv2 ViT (layer scale, the class token, no
registers) at 128 px, patch 8, width 128, 6 blocks of 4 heads.
"""
from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent
TINY_CLIP = "ViT-Tiny-8-128"
TINY_DINO = "vit_tiny_patch8_dinov2_world"
# DINOv2 configs of this project: name -> (the timm model they are built as, its arguments).
DINO_CONFIGS = {TINY_DINO: ("vit_small_patch14_dinov2",
                            dict(img_size=128, patch_size=8, embed_dim=128, depth=6, num_heads=4))}


def register_model_configs() -> None:
    """Make the configs of this folder known to ``open_clip.create_model`` (idempotent)."""
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
