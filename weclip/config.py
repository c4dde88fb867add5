"""The configuration of a WeCLIP model: the one place its defaults live.

The defaults are the paper's ViT-B/16 settings as the authors' code runs them (docs/method.md,
sections 2-5 and 8). A trained model file carries its configuration (``weclip.factory``), so a
model is rebuilt from the file alone, never from whatever params.yaml says later.
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
class ModelConfig:
    """Everything that defines a WeCLIP model besides its classes."""

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
    box_threshold: float = 0.4  # COCO: 0.7
    static_layers: int | None = None  # None: 8/12 of the backbone's depth
    rfm_layers: int | None = None  # None: 6/12 of the backbone's depth (COCO: 10)
    rfm_signed: bool = True  # the authors' code; False: the paper's absolute difference
    background_power: float = 1.0
    par_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    par_iters: int = 20
