"""WeCLIP: frozen CLIP + decoder, trained on its own refined CAMs (METHOD.md sections 3-5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneFeatures, FrozenCLIP
from .cam import PresentClasses, box_mask, grad_cam, min_max
from .decoder import Decoder, affinity
from .par import PAR
from .refine import (refine_cams, scaled_layers, select_attention, static_attention,
                     transition_matrix)

REFINEMENTS = ("none", "static", "rfm")


@dataclass
class WeCLIPOutput:
    """logits [B, C+1, h, w]; with labels also pseudo [B, H, W] long and affinity [B, hw, hw]."""

    logits: torch.Tensor
    pseudo: torch.Tensor | None = None
    affinity: torch.Tensor | None = None


class WeCLIP(nn.Module):
    """The WeCLIP segmenter.

    ``forward(images)`` predicts; ``forward(images, labels)`` also makes the online pseudo
    labels that train it. The layer counts of METHOD.md (mean of the last 8 maps, RFM over the
    last 6, for N = 12 blocks) scale with the backbone's depth unless given.
    """

    def __init__(self, backbone: FrozenCLIP, prompts: list[str], background: list[str], *,
                 template: str = "a clean origami {}.", decoder_dim: int = 256,
                 decoder_layers: int = 3, decoder_heads: int = 8, dropout: float = 0.1,
                 box_threshold: float = 0.4, static_layers: int | None = None,
                 rfm_layers: int | None = None, rfm_signed: bool = True,
                 background_power: float = 1.0, par_dilations=(1, 2, 4, 8, 12, 24),
                 par_iters: int = 20):
        super().__init__()
        self.backbone = backbone
        depth = backbone.depth
        self.box_threshold = box_threshold
        self.static_layers = static_layers or scaled_layers(depth, 8)
        self.rfm_layers = rfm_layers or scaled_layers(depth, 6)
        self.rfm_signed = rfm_signed
        self.background_power = background_power
        # Text features are fixed: encode once, keep with the module, leave out of checkpoints.
        self.register_buffer("fg_text", backbone.encode_text(prompts, template), persistent=False)
        self.register_buffer("bg_text", backbone.encode_text(background, template), persistent=False)
        self.decoder = Decoder(backbone.width, depth - 1, len(prompts) + 1, decoder_dim,
                               decoder_layers, decoder_heads, dropout)
        self.par = PAR(par_dilations, par_iters)

    @property
    def num_classes(self) -> int:
        return self.decoder.classifier.out_channels

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                refinement: str = "rfm", features: BackboneFeatures | None = None,
                masks: torch.Tensor | None = None) -> WeCLIPOutput:
        """images: [B, 3, H, W] normalised; labels: [B, C] multi-hot foreground classes.

        Without labels only the decoder runs. ``features`` skips the backbone (cached tokens).
        ``refinement`` picks the CAM refinement: 'rfm', 'static' or 'none'. ``masks``
        [B, H, W], ground truth, replace the pseudo labels: the fully supervised upper bound.
        """
        features = features if features is not None else self.backbone(images)
        logits, fused = self.decoder(features.tokens[:, :, 1:], features.grid)
        if labels is None and masks is None:
            return WeCLIPOutput(logits)
        aff = affinity(fused)
        if masks is not None:
            return WeCLIPOutput(logits, masks, aff)
        cams, pairs = self.cams(images, labels, features, aff, refinement)
        return WeCLIPOutput(logits, self.cam_labels(images, cams, pairs), aff)

    def cams(self, images: torch.Tensor, labels: torch.Tensor, features: BackboneFeatures,
             aff: torch.Tensor | None = None, refinement: str = "rfm"):
        """CAMs of every present class, refined, at the images' size.

        Returns (cams [P, H, W] in [0, 1], PresentClasses of the P pairs).
        """
        if refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, not {refinement!r}")
        pairs = PresentClasses.from_labels(labels, images.device)
        cams = grad_cam(self.backbone, features.tokens[:, -1], features.grid, pairs, labels,
                        self.fg_text, self.bg_text)
        if refinement != "none":
            attn = features.attn[:, :, 1:, 1:].float()
            if refinement == "static":
                walk = static_attention(attn, self.static_layers)
            else:
                walk, _ = select_attention(attn, aff.float(), self.rfm_layers, self.rfm_signed)
            boxes = box_mask(cams, self.box_threshold)
            cams = min_max(refine_cams(cams, boxes, transition_matrix(walk), pairs.image))
        cams = F.interpolate(cams[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        return cams, pairs

    @torch.no_grad()
    def cam_labels(self, images: torch.Tensor, cams: torch.Tensor, pairs: PresentClasses,
                   par: bool = True) -> torch.Tensor:
        """Pseudo labels [B, H, W] from the CAMs [P, H, W] of ``pairs``.

        Stacks [background, class CAMs] per image (padded to the most classes in one image),
        background = (1 - max CAM) ** power, refines with PAR, and maps the argmax to class ids.
        """
        b, (h, w) = images.shape[0], cams.shape[-2:]
        slots = (pairs.image, 1 + pairs.slot)
        stack = cams.new_zeros(b, 1 + pairs.width, h, w)
        stack[slots] = cams
        stack[:, 0] = (1 - stack[:, 1:].amax(1)) ** self.background_power
        if par:
            stack = self.par(images, stack)
        valid = torch.zeros(b, 1 + pairs.width, dtype=torch.bool, device=cams.device)
        valid[:, 0] = True
        valid[slots] = True
        index = stack.masked_fill(~valid[..., None, None], float("-inf")).argmax(1)
        class_ids = torch.zeros(b, 1 + pairs.width, dtype=torch.long, device=cams.device)
        class_ids[slots] = pairs.klass + 1
        return class_ids.gather(1, index.flatten(1)).view(b, h, w)
