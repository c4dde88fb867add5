"""Pixel-adaptive refinement (PAR, from AFA): CAMs smoothed along image colour (docs/method.md, section 5)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The 8 neighbours, row by row from the top-left, as (dy, dx) in units of the dilation.
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


class PAR(nn.Module):
    """Refine masks by iterated averaging over colour-similar dilated neighbours.

    forward(images [B, 3, H, W] normalised, masks [B, C, h, w]) -> [B, C, h, w]. Channels are
    refined independently with the same affinity, so padded channels do not disturb others.
    Neighbours beyond the border are the border pixel (replicate padding).
    """

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter: int = 20,
                 colour_weight: float = 0.3, position_weight: float = 0.01):
        super().__init__()
        self.dilations = tuple(dilations)
        self.num_iter = num_iter
        self.colour_weight = colour_weight
        offsets = [(dy * d, dx * d) for d in self.dilations for dy, dx in _NEIGHBOURS]
        distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=torch.float64)
        position = -(distance / (distance.std() + 1e-8) / colour_weight) ** 2
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)  # [K, 2]
        # The position term does not depend on the image: its share of the affinity, [K].
        self.register_buffer("position", (position_weight * position.softmax(0)).float(),
                             persistent=False)

    def neighbours(self, batch: int, h: int, w: int) -> torch.Tensor:
        """Flat indices [batch * h * w, K] into batch stacked h x w maps of each pixel's K
        neighbours, clamped to the map (replicate padding)."""
        dy, dx = self.offsets.int().unbind(1)
        device = dy.device
        rows = (torch.arange(h, dtype=torch.int32, device=device)[:, None, None] + dy).clamp(0, h - 1)
        cols = (torch.arange(w, dtype=torch.int32, device=device)[None, :, None] + dx).clamp(0, w - 1)
        first = torch.arange(0, batch * h * w, h * w, dtype=torch.int32, device=device)
        return ((rows * w + cols)[None] + first.view(batch, 1, 1, 1)).view(batch * h * w, -1)

    def affinity(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Neighbour weights [B * h * w, K] from colour and position: images [B, 3, h, w] at
        the masks' size, ``index`` their ``neighbours``."""
        pixels = images.transpose(0, 1).reshape(3, -1)  # [3, B * hw]
        near = pixels.index_select(1, index.flatten()).view(3, *index.shape)  # [3, B * hw, K]
        diff = near.sub_(pixels[..., None])
        # The neighbours' standard deviation (that of the differences, shifted by the pixel's
        # own value), in two passes for precision.
        centred = diff - diff.mean(-1, keepdim=True)
        std = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / (index.shape[1] - 1) ** 0.5
        colour = centred.copy_(diff).abs_().div_(std + 1e-8).div_(self.colour_weight).pow_(2)
        return colour.mean(0).neg_().softmax(-1).add_(self.position)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(images.dtype, torch.float32)  # half precision is too coarse
        b, c, h, w = masks.shape
        index = self.neighbours(b, h, w)
        images = F.interpolate(images.to(dtype), size=(h, w), mode="bilinear", align_corners=True)
        weights = self.affinity(images, index).flatten()
        # Pixel i's neighbours are entries iK..(i+1)K - 1 of the flat index: one bag each.
        bags = torch.arange(0, index.numel() + 1, index.shape[1], dtype=index.dtype,
                            device=index.device)
        index = index.flatten()
        x = masks.to(dtype).permute(0, 2, 3, 1).reshape(-1, c)  # [B * hw, C]
        for _ in range(self.num_iter):
            # Each pixel's weighted sum over its neighbours in one fused gather, without
            # materialising the K shifted copies of the masks.
            x = F.embedding_bag(index, x, bags, per_sample_weights=weights, mode="sum",
                                include_last_offset=True)
        return x.view(b, h, w, c).permute(0, 3, 1, 2)
