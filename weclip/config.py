"""The configuration of a WeCLIP or WeCLIP+ model: the one place its defaults live.

The defaults are the paper's ViT-B/16 settings as the authors' code runs them (docs/method.md,
sections 2-5 and 8); ``dino`` makes the model WeCLIP+ (section 10). A trained model file
carries its configuration (``weclip.factory``), so a model is rebuilt from the file alone,
never from whatever params.yaml says later.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Pixel statistics on the 0-255 scale (docs/method.md, section 1): the authors' code normalises
# with ImageNet's for CLIP and PAR alike; CLIP's own are an option.
NORMALIZATION = {
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "clip": ((122.771, 116.746, 104.094), (68.501, 66.632, 70.323)),
}


@dataclass
class DinoConfig:
    """The frozen DINOv2 of WeCLIP+ (docs/method.md, section 10): a timm DINOv2 ViT (or the
    world's, weclip/model_configs), and a weight file in the official DINOv2 release format, a
    timm pretrained tag, or None for random weights."""

    arch: str = "vit_small_patch14_dinov2"  # the authors' default, dinov2_vits14
    weights: str | None = "data/pretrained/dinov2_vits14_pretrain.pth"


@dataclass
class ModelConfig:
    """Everything that defines a WeCLIP (or, with ``dino``, WeCLIP+) model besides its classes."""

    # The frozen CLIP (section 2): an open_clip config, and a weight file, an open_clip
    # pretrained tag or None for random weights. OpenAI's weights need the QuickGELU config.
    arch: str = "ViT-B-16-quickgelu"
    weights: str | None = "openai"
    template: str = "a clean origami {}."  # the authors' code; the paper writes "a clear origami"
    normalization: str = "imagenet"  # the authors' code; "clip" for CLIP's own statistics
    # The decoder (section 3).
    decoder_dim: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    dropout: float = 0.1
    # CAM refinement (section 5).
    # The block whose tokens Grad-CAM runs block N on, counted from the end of blocks 1..N-1:
    # -1 is block N-1 (WeCLIP; WeCLIP+ on COCO), -2 block N-2 (WeCLIP+ on VOC).
    cam_layer: int = -1
    box_threshold: float | None = 0.4  # COCO: 0.7; None: no box (WeCLIP+ on VOC)
    static_layers: int | None = None  # None: 8/12 of the backbone's depth
    rfm_layers: int | None = None  # None: 6/12 of the backbone's depth (COCO: 10)
    rfm_signed: bool = True  # the authors' code; False: the paper's absolute difference
    background_power: float = 1.0
    par_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    par_iters: int = 20
    # WeCLIP+: a frozen DINOv2 beside the frozen CLIP (section 10); None: WeCLIP.
    dino: DinoConfig | None = None

    def __post_init__(self):
        if isinstance(self.dino, dict):  # as read back from a model file
            self.dino = DinoConfig(**self.dino)
