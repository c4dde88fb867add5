"""WeCLIP: frozen CLIP + decoder, trained on its own refined CAMs (docs/method.md, sections 3-5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .backbone import BackboneFeatures, FrozenCLIP
from .cam import PresentClasses, box_mask, grad_cam, min_max
from .config import ModelConfig
from .dataset import ClassInfo
from .decoder import Decoder, affinity
from .par import PAR
from .refine import (refine_cams, scaled_layers, select_attention, static_attention,
                     transition_matrix)

REFINEMENTS = ("none", "static", "rfm")


@dataclass
class WeCLIPOutput:
    """logits [B, C+1, h, w]; affinity A_f [B, hw, hw] when asked for or with labels; with
    labels, the online pseudo labels [B, H, W] long."""

    logits: torch.Tensor
    affinity: torch.Tensor | None = None
    pseudo: torch.Tensor | None = None


class WeCLIP(nn.Module):
    """The WeCLIP segmenter of ``classes``, configured by ``config``.

    Images come on the 0-255 scale; the backbone normalises them. ``forward(images)`` predicts;
    ``forward(images, labels)`` also makes the online pseudo labels that train it. The layer
    counts of the refinement scale with the backbone's depth unless the config gives them.
    """

    def __init__(self, backbone: FrozenCLIP, classes: ClassInfo, config: ModelConfig):
        super().__init__()
        self.backbone, self.classes, self.config = backbone, classes, config
        depth = backbone.depth
        self.static_layers = config.static_layers or scaled_layers(depth, 8)
        self.rfm_layers = config.rfm_layers or scaled_layers(depth, 6)
        # Text features are fixed: encode once, keep with the module, leave out of checkpoints.
        self.register_buffer("fg_text", backbone.encode_text(classes.prompts, config.template),
                             persistent=False)
        self.register_buffer("bg_text", backbone.encode_text(classes.background, config.template),
                             persistent=False)
        self.decoder = Decoder(backbone.width, depth - 1, classes.num_classes, config.decoder_dim,
                               config.decoder_layers, config.decoder_heads, config.dropout)
        self.par = PAR(config.par_dilations, config.par_iters)

    @property
    def num_classes(self) -> int:
        """Segmentation classes, background included."""
        return self.classes.num_classes

    def features(self, images: torch.Tensor) -> BackboneFeatures:
        """The frozen CLIP's features of images [B, 3, H, W] on the 0-255 scale."""
        with record_function("backbone forward"):
            return self.backbone(self.backbone.normalize(images))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                refinement: str = "rfm", features: BackboneFeatures | None = None,
                with_affinity: bool = False) -> WeCLIPOutput:
        """images: [B, 3, H, W] on the 0-255 scale; labels: [B, C] multi-hot foreground classes.

        Without labels only the decoder runs (and A_f with ``with_affinity``). ``features`` skips the
        backbone (cached tokens). ``refinement`` picks the pseudo labels' CAM refinement.
        """
        features = features if features is not None else self.features(images)
        with record_function("decoder forward"):
            logits, fused = self.decoder(features.tokens[:, :, 1:], features.grid)
        if labels is None and not with_affinity:
            return WeCLIPOutput(logits)
        aff = affinity(fused)
        if labels is None:
            return WeCLIPOutput(logits, aff)
        return WeCLIPOutput(logits, aff, self.pseudo_labels(images, labels, features, aff, refinement))

    def walk(self, features: BackboneFeatures, aff: torch.Tensor | None,
             refinement: str) -> torch.Tensor:
        """The attention R [B, hw, hw] that ``refinement`` ('static' or 'rfm') walks on
        (section 5); 'rfm' needs the decoder's affinity ``aff`` [B, hw, hw]."""
        attn = features.attn[:, :, 1:, 1:].float()
        if refinement == "static":
            return static_attention(attn, self.static_layers)
        return select_attention(attn, aff.float(), self.rfm_layers, self.config.rfm_signed)[0]

    def cams(self, images: torch.Tensor, labels: torch.Tensor, features: BackboneFeatures,
             aff: torch.Tensor | None = None, refinement: str = "rfm"):
        """CAMs of every present class, refined, at the images' size (sections 4-5).

        images: [B, 3, H, W]; labels: [B, C] multi-hot (best kept on the CPU).
        Returns (cams [P, H, W] in [0, 1], PresentClasses of the P pairs).
        """
        if refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, not {refinement!r}")
        pairs = PresentClasses.from_labels(labels, images.device)
        with record_function("Grad-CAM"):
            cams = grad_cam(self.backbone, features.tokens[:, -1], features.grid, pairs, labels,
                            self.fg_text, self.bg_text)
        if refinement != "none":
            with record_function("refinement"):
                transition = transition_matrix(self.walk(features, aff, refinement))
                boxes = box_mask(cams, self.config.box_threshold)
                cams = min_max(refine_cams(cams, boxes, transition, pairs.image))
        cams = F.interpolate(cams[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        return cams, pairs

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, labels: torch.Tensor,
                      features: BackboneFeatures, aff: torch.Tensor | None = None,
                      refinement: str = "rfm", par: bool = True) -> torch.Tensor:
        """Pseudo labels [B, H, W] long of images [B, 3, H, W] (0-255) with labels [B, C].

        The CAMs of ``refinement`` are stacked per image as [background, present classes]
        (padded to the most classes in one image), background = (1 - max CAM) ** power,
        refined with PAR (``par``), and the argmax is mapped to class ids. Always in float32,
        also under autocast: CAMs, the walk's normalisations and PAR need the precision.
        """
        with torch.autocast(images.device.type, enabled=False):
            return self._pseudo_labels(images, labels, features, aff, refinement, par)

    def _pseudo_labels(self, images, labels, features, aff, refinement, par):
        cams, pairs = self.cams(images, labels, features, aff, refinement)
        b, (h, w) = images.shape[0], cams.shape[-2:]
        slots = (pairs.image, 1 + pairs.slot)
        stack = cams.new_zeros(b, 1 + pairs.width, h, w)
        stack[slots] = cams
        stack[:, 0] = (1 - stack[:, 1:].amax(1)) ** self.config.background_power
        if par:
            with record_function("PAR"):
                stack = self.par(self.backbone.normalize(images), stack)
        valid = torch.zeros(b, 1 + pairs.width, dtype=torch.bool, device=cams.device)
        valid[:, 0] = True
        valid[slots] = True
        index = stack.masked_fill(~valid[..., None, None], float("-inf")).argmax(1)
        class_ids = torch.zeros(b, 1 + pairs.width, dtype=torch.long, device=cams.device)
        class_ids[slots] = pairs.klass + 1
        return class_ids.gather(1, index.flatten(1)).view(b, h, w)

