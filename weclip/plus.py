"""WeCLIP+: a frozen DINOv2 beside the frozen CLIP (docs/method.md, section 10).

Everything WeCLIP does stays, with three changes the authors' code makes: the decoder fuses the
CLIP's last kept block and the DINO's patch tokens each on their own and segments both with one
head (the prediction is the two logits averaged); the affinity A_f comes from both fused maps;
and each CAM is multiplied by the detached softmax of that prediction, at its class, before the
RFM propagates it.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import FrozenCLIP
from .batch import BackboneFeatures, PresentClasses
from .config import ModelConfig
from .contract import ClassInfo
from .decoder import PlusDecoder
from .dino import FrozenDINO
from .model import WeCLIP
from .profiling import phase


class WeCLIPPlus(WeCLIP):
    """The WeCLIP+ segmenter of ``classes``: WeCLIP with ``dino`` beside ``backbone``."""

    def __init__(self, backbone: FrozenCLIP, dino: FrozenDINO, classes: ClassInfo,
                 config: ModelConfig):
        self._dino_width = dino.width  # make_decoder, run by WeCLIP's __init__, needs it
        super().__init__(backbone, classes, config)
        self.dino = dino

    def compile_parts(self) -> "WeCLIPPlus":
        super().compile_parts()
        self._compiled["dino"] = torch.compile(self.dino, fullgraph=True, dynamic=False)
        return self

    def make_decoder(self) -> nn.Module:
        c = self.config
        return PlusDecoder(self.backbone.width, self._dino_width, self.classes.num_classes,
                           c.decoder_dim, c.decoder_layers, c.decoder_heads, c.dropout)

    def features(self, images: torch.Tensor) -> BackboneFeatures:
        """The frozen CLIP's and DINO's features of images [B, 3, H, W] (0-255), both on the
        same normalised pixels."""
        with phase("backbone forward"):
            normalised = self.backbone.normalize(images)
            features = self._part("backbone")(normalised)
            features.dino, features.dino_grid = self._part("dino")(normalised)
            return features

    def decode(self, features: BackboneFeatures):
        """(the branches' logits averaged, both F_u concatenated, (CLIP logits, DINO logits))."""
        clip, dino, fused = self._part("decoder")(
            features.tokens[:, -1:, 1:], features.grid, features.dino[:, None],
            features.dino_grid)
        return 0.5 * clip + 0.5 * dino, fused, (clip, dino)

    def cam_scale(self, logits: torch.Tensor | None, features: BackboneFeatures,
                  pairs: PresentClasses) -> torch.Tensor:
        """The detached softmax of the prediction at each slot's class: [B, K, h, w]."""
        if logits is None:
            logits = self.decode(features)[0]
        probs = logits.detach().float().softmax(1)
        index = (pairs.classes + 1)[..., None, None].expand(-1, -1, *probs.shape[-2:])
        return probs.gather(1, index)
