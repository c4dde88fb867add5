"""Pixel-adaptive refinement (docs/method.md, section 5)."""
import math

import torch

from weclip.par import PAR


def naive_par(image, masks, dilations, num_iter):
    """The specification, pixel by pixel: replicate-clamped neighbours, softmax affinities."""
    _, h, w = image.shape
    offsets = [(dy * d, dx * d, d * (math.sqrt(2) if dy and dx else 1.0))
               for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    dist = torch.tensor([o[2] for o in offsets], dtype=torch.float64)
    pos = -(dist / dist.std() / 0.3) ** 2
    aff = torch.zeros(len(offsets), h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            near = torch.stack([image[:, min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)]
                                for oy, ox, _ in offsets], 1)  # [3, n]
            col = -((near - image[:, y, x, None]).abs() / (near.std(1, keepdim=True) + 1e-8) / 0.3) ** 2
            aff[:, y, x] = col.mean(0).softmax(0) + 0.01 * pos.softmax(0)
    for _ in range(num_iter):
        new = torch.zeros_like(masks)
        for k, (oy, ox, _) in enumerate(offsets):
            ys = (torch.arange(h) + oy).clamp(0, h - 1)
            xs = (torch.arange(w) + ox).clamp(0, w - 1)
            new += masks[:, ys][:, :, xs] * aff[k]
        masks = new
    return masks


def test_par_matches_the_pixelwise_definition():
    torch.manual_seed(0)
    image, masks = torch.randn(1, 3, 9, 11).double(), torch.rand(1, 2, 9, 11).double()
    par = PAR(dilations=(1, 2, 4), num_iter=3).double()
    expected = naive_par(image[0], masks[0], (1, 2, 4), 3)
    assert torch.allclose(par(image, masks)[0], expected, atol=1e-10)


def test_par_resizes_the_image_to_the_masks_and_keeps_channels_independent():
    par = PAR()
    image, masks = torch.randn(2, 3, 64, 48), torch.rand(2, 3, 32, 24)
    out = par(image, masks)
    assert out.shape == masks.shape
    alone = par(image, masks[:, :1])
    assert torch.allclose(out[:, :1], alone, atol=1e-6)
