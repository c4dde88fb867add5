"""Multi-scale + flip inference (docs/method.md, section 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_long_side(images: torch.Tensor, long_side: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, h, w] with max(h, w) = long_side (sizes truncated, bilinear)."""
    h, w = images.shape[-2:]
    ratio = long_side / max(h, w)
    return F.interpolate(images, size=(int(h * ratio), int(w * ratio)), mode="bilinear",
                         align_corners=False)


@torch.no_grad()
def predict(model, images: torch.Tensor, scales=(1.0, 0.75), flip: bool = True,
            long_side: int | None = 512) -> torch.Tensor:
    """Class probabilities [B, C, H, W] for images [B, 3, H, W] on the 0-255 scale.

    The images are resized to ``long_side`` (None keeps them), then for each scale (and its
    horizontal flip) the logits are resized to the first scale's grid and averaged; the average
    is upsampled to the input size and soft-maxed.
    """
    size = images.shape[-2:]
    base_input = resize_long_side(images, long_side) if long_side else images
    total, grid = 0.0, None
    for scale in scales:
        x = base_input if scale == 1.0 else F.interpolate(
            base_input, scale_factor=scale, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = model(x).logits.float()
        grid = grid or logits.shape[-2:]
        logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
        if flip:
            straight, mirrored = logits.chunk(2)
            logits = (straight + mirrored.flip(-1)) / 2
        total = total + logits
    logits = F.interpolate(total / len(scales), size=size, mode="bilinear", align_corners=False)
    return logits.softmax(1)
