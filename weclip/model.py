"""WeCLIP: frozen CLIP + decoder, trained on its own refined CAMs (docs/method.md, sections 3-5)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FrozenCLIP
from .batch import BackboneFeatures, PresentClasses
from .cam import box_mask, grad_cam, min_max
from .config import ModelConfig
from .contract import ClassInfo
from .decoder import Decoder, affinity
from .par import PAR
from .profiling import phase
from .refine import (refine_cams, scaled_layers, select_attention, static_attention,
                     transition_matrix)

REFINEMENTS = ("none", "static", "rfm")


@dataclass
class WeCLIPOutput:
    """logits [B, C+1, h, w]; affinity A_f [B, hw, hw] when asked for or with labels; with
    labels, the online pseudo labels [B, H, W] long; WeCLIP+'s two branches' logits, whose
    average ``logits`` is."""

    logits: torch.Tensor
    affinity: torch.Tensor | None = None
    pseudo: torch.Tensor | None = None
    branches: tuple[torch.Tensor, torch.Tensor] | None = None


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
        if not -(depth - 1) <= config.cam_layer <= -1:
            raise ValueError(f"cam_layer {config.cam_layer}: must be between -{depth - 1} and -1 "
                             f"(the tokens of blocks 1..N-1 of {config.arch}'s {depth})")
        self.static_layers = config.static_layers or scaled_layers(depth, 8)
        self.rfm_layers = config.rfm_layers or scaled_layers(depth, 6)
        # Text features are fixed: encode once, keep with the module, leave out of checkpoints.
        self.register_buffer("fg_text", backbone.encode_text(classes.prompts, config.template),
                             persistent=False)
        self.register_buffer("bg_text", backbone.encode_text(classes.background, config.template),
                             persistent=False)
        self.decoder = self.make_decoder()
        self.par = PAR(config.par_dilations, config.par_iters)

    def make_decoder(self) -> nn.Module:
        """The trainable part: WeCLIP's decoder on the CLIP's blocks 1..N-1."""
        c = self.config
        return Decoder(self.backbone.width, self.backbone.depth - 1, self.classes.num_classes,
                       c.decoder_dim, c.decoder_layers, c.decoder_heads, c.dropout)

    @property
    def num_classes(self) -> int:
        """Segmentation classes, background included."""
        return self.classes.num_classes

    def compile_parts(self) -> "WeCLIP":
        """Compile the step's parts with torch.compile for training: the backbone, the decoder
        (as it is then, wrapped for data parallelism or not) and the three parts of the pseudo
        labels (Grad-CAM, refinement, labelling with PAR), each one whole graph per input
        size (docs/scaling.md). Evaluation, on whole images of any size, stays eager."""
        def whole(fn):
            return torch.compile(fn, fullgraph=True, dynamic=False)

        self._compiled = {"backbone": whole(self.backbone),
                          "decoder": torch.compile(self.decoder, dynamic=False),
                          **{name: whole(getattr(self, name)) for name in
                             ("initial_cams", "refined_cams", "labels_from_cams")}}
        return self

    def _part(self, name: str):
        """The part ``name`` (a submodule or a method) as this mode runs it: compiled when
        training after ``compile_parts``, else as it is."""
        compiled = getattr(self, "_compiled", {})
        return compiled[name] if self.training and name in compiled else getattr(self, name)

    def features(self, images: torch.Tensor) -> BackboneFeatures:
        """The frozen CLIP's features of images [B, 3, H, W] on the 0-255 scale."""
        with phase("backbone forward"):
            return self._part("backbone")(self.backbone.normalize(images))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | PresentClasses | None = None,
                *, refinement: str = "rfm", features: BackboneFeatures | None = None,
                with_affinity: bool = False) -> WeCLIPOutput:
        """images: [B, 3, H, W] on the 0-255 scale; labels: [B, C] multi-hot foreground classes
        (on the CPU), or the ``PresentClasses`` a collate function laid out.

        Without labels only the decoder runs (and A_f with ``with_affinity``). ``features`` skips the
        backbone (cached tokens). ``refinement`` picks the pseudo labels' CAM refinement.
        """
        features = features if features is not None else self.features(images)
        with phase("decoder forward"):
            logits, fused, branches = self.decode(features)
            aff = affinity(fused) if labels is not None or with_affinity else None
        pseudo = None
        if labels is not None:
            pseudo = self.pseudo_labels(images, labels, features, aff, refinement, logits=logits)
        return WeCLIPOutput(logits, aff, pseudo, branches)

    def decode(self, features: BackboneFeatures):
        """The decoder on ``features``: (logits [B, C+1, h, w], F_u [B, dim, h, w], None)."""
        logits, fused = self._part("decoder")(features.tokens[:, :, 1:], features.grid)
        return logits, fused, None

    def cam_scale(self, logits: torch.Tensor | None, features: BackboneFeatures,
                  pairs: PresentClasses) -> torch.Tensor | None:
        """What each slot's CAM is multiplied by before the RFM propagates it: nothing in
        WeCLIP (WeCLIP+ scales it by its prediction)."""
        return None

    def walk(self, features: BackboneFeatures, aff: torch.Tensor | None,
             refinement: str) -> torch.Tensor:
        """The attention R [B, hw, hw] that ``refinement`` ('static' or 'rfm') walks on
        (section 5); 'rfm' needs the decoder's affinity ``aff`` [B, hw, hw]."""
        return self._walk(features.attn, aff, refinement)

    def _walk(self, attn: torch.Tensor, aff: torch.Tensor | None, refinement: str) -> torch.Tensor:
        attn = attn[:, :, 1:, 1:].float()
        if refinement == "static":
            return static_attention(attn, self.static_layers)
        return select_attention(attn, aff.float(), self.rfm_layers, self.config.rfm_signed)[0]

    def initial_cams(self, last_tokens: torch.Tensor, grid: tuple[int, int],
                     pairs: PresentClasses) -> torch.Tensor:
        """Grad-CAMs [B, K, h, w] of the K slots of each image (section 4)."""
        return grad_cam(self.backbone, last_tokens, grid, pairs, self.fg_text, self.bg_text)

    def refined_cams(self, cams: torch.Tensor, attn: torch.Tensor, aff: torch.Tensor | None,
                     refinement: str, size: tuple[int, int],
                     scale: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs [B, K, h, w] refined by ``refinement`` with the attention ``attn`` [B, N, 1+hw,
        1+hw] (and A_f for 'rfm'), each first multiplied by ``scale`` [B, K, h, w] when given,
        then resized to ``size`` (section 5). Boxes come from the CAMs as they are."""
        if refinement != "none":
            transition = transition_matrix(self._walk(attn, aff, refinement))
            threshold = self.config.box_threshold
            boxes = torch.ones_like(cams) if threshold is None else box_mask(cams, threshold)
            if scale is not None:
                cams = cams * scale
            cams = min_max(refine_cams(cams, boxes, transition))
        return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)

    def cams(self, images: torch.Tensor, pairs: PresentClasses, features: BackboneFeatures,
             aff: torch.Tensor | None = None, refinement: str = "rfm",
             scale: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs [B, K, H, W] in [0, 1] of the K slots of each image (0 for padding), refined
        by ``refinement``, at the images' size (sections 4-5). Grad-CAM runs block N on the
        tokens of ``config.cam_layer``, and the last attention map is block N's there."""
        if refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, not {refinement!r}")
        tokens, attn = features.tokens[:, self.config.cam_layer], features.attn
        if self.config.cam_layer != -1:
            attn = torch.cat([attn[:, :-1], self.backbone.last_attention(tokens)[:, None]], 1)
        with phase("Grad-CAM"):
            cams = self._part("initial_cams")(tokens, features.grid, pairs)
        with phase("refinement"):
            return self._part("refined_cams")(cams, attn, aff, refinement, images.shape[-2:],
                                              scale)

    def labels_from_cams(self, images: torch.Tensor, cams: torch.Tensor, pairs: PresentClasses,
                         par: bool = True) -> torch.Tensor:
        """Pseudo labels [B, H, W] long from the CAMs [B, K, H, W] of ``pairs``: stacked as
        [background, CAMs], background = (1 - max CAM) ** power, refined with PAR (``par``);
        the argmax over the background and the valid slots, as class ids."""
        background = (1 - cams.amax(1, keepdim=True)) ** self.config.background_power
        stack = torch.cat([background, cams], 1)
        if par:
            stack = self.par(self.backbone.normalize(images), stack)
        valid = F.pad(pairs.valid, (1, 0), value=True)
        index = stack.masked_fill(~valid[..., None, None], float("-inf")).argmax(1)
        class_ids = F.pad(pairs.classes + 1, (1, 0), value=0)
        return class_ids.gather(1, index.flatten(1)).view_as(index)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, labels: torch.Tensor | PresentClasses,
                      features: BackboneFeatures, aff: torch.Tensor | None = None,
                      refinement: str = "rfm", par: bool = True,
                      logits: torch.Tensor | None = None) -> torch.Tensor:
        """Pseudo labels [B, H, W] long of images [B, 3, H, W] (0-255) with ``labels`` (as
        ``forward`` takes them); ``logits``: the decoder's, which WeCLIP+ scales its CAMs by.
        Always in float32, also under autocast: CAMs, the walk's normalisations and PAR need
        the precision."""
        if not isinstance(labels, PresentClasses):
            labels = PresentClasses.from_labels(labels).to(images.device)
        device = images.device.type
        with (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
              else contextlib.nullcontext()):
            scale = self.cam_scale(logits, features, labels)
            cams = self.cams(images, labels, features, aff, refinement, scale)
            with phase("PAR"):
                return self._part("labels_from_cams")(images, cams, labels, par)
