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
    """

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter: int = 20,
                 colour_weight: float = 0.3, position_weight: float = 0.01):
        super().__init__()
        self.dilations = tuple(dilations)
        self.num_iter = num_iter
        self.colour_weight = colour_weight
        self.position_weight = position_weight
        distance = [d * (math.sqrt(2) if dy and dx else 1.0)
                    for d in self.dilations for dy, dx in _NEIGHBOURS]
        self.register_buffer("distance", torch.tensor(distance).view(1, 1, -1, 1, 1), persistent=False)

    def shifted(self, x: torch.Tensor):
        """Yield the 8 * len(dilations) neighbour views of [B, C, h, w], replicate-padded."""
        h, w = x.shape[-2:]
        for d in self.dilations:
            padded = F.pad(x, [d] * 4, mode="replicate")
            for dy, dx in _NEIGHBOURS:
                yield padded[..., d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w]

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C, 8 * len(dilations), h, w]."""
        return torch.stack(list(self.shifted(x)), dim=2)

    def affinity(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Neighbour weights [B, 1, 8 * len(dilations), h, w] from colour and position."""
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
        near = self.neighbours(images)
        colour = -((near - images.unsqueeze(2)).abs() / (near.std(2, keepdim=True) + 1e-8)
                   / self.colour_weight) ** 2
        colour = colour.mean(1, keepdim=True)
        position = -(self.distance / (self.distance.std(2, keepdim=True) + 1e-8)
                     / self.colour_weight) ** 2
        return colour.softmax(2) + self.position_weight * position.softmax(2)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(images.dtype, torch.float32)  # half precision is too coarse
        aff = self.affinity(images.to(dtype), masks.shape[-2:])
        masks = masks.to(dtype)
        # One contiguous [B, 1, h, w] weight map per neighbour: strided slices of the
        # [B, 1, K, h, w] affinity make the products below 50x slower on a CPU.
        weights = aff.movedim(2, 0).contiguous()
        for _ in range(self.num_iter):
            # Accumulating neighbour by neighbour never holds all shifted copies at once.
            out = torch.zeros_like(masks)
            for near, weight in zip(self.shifted(masks), weights):
                out += near * weight
            masks = out
        return masks
