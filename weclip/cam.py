"""Initial CAMs by Grad-CAM on the frozen CLIP, and their box masks (docs/method.md, sections 4-5).

CAMs are computed for (image, class) pairs: one per foreground class present in an image, in the
K slots per image of ``weclip.batch.PresentClasses``, padding included, so that the pseudo
labels' path reads nothing back from the device and keeps one shape (docs/scaling.md).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .batch import PresentClasses

# The attention's backward has no batching rule yet: vmap runs it once per slot, which is what
# it costs anyway, and says so at every step.
warnings.filterwarnings("ignore", "There is a performance drop because we have not yet "
                        "implemented the batching rule for aten::_scaled_dot_product")


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale each map of [..., h, w] to [0, 1]: (x - min) / (max + 1e-7) after the shift."""
    x = x - x.amin((-2, -1), keepdim=True)
    return x / (x.amax((-2, -1), keepdim=True) + 1e-7)


def grad_cam(backbone, last_tokens: torch.Tensor, grid: tuple[int, int], pairs: PresentClasses,
             fg_text: torch.Tensor, bg_text: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every slot of ``pairs``, on the frozen CLIP ``backbone``.

    last_tokens: [B, 1+hw, D] block N-1 output; fg_text: [C, E], bg_text: [G, E] normalised
    text features. Block N and the CAM head run once per image; the gradients of the K slots'
    target scores come from one vectorised backward pass (a vector-Jacobian product per slot),
    each exactly as if computed alone; a padding slot's target is 0, and so is its CAM. The
    softmax runs over the image's present classes and all background words. The CAM is min-max
    scaled twice, as the authors' Grad-CAM library does (docs/method.md, section 4), so each map
    peaks at 1 (to within the 1e-7 guard). Returns CAMs [B, K, h, w].
    """
    b, k = pairs.classes.shape
    x = last_tokens.detach().float()
    absent = F.pad(~pairs.present, (0, len(bg_text)), value=False)
    text = torch.cat([fg_text, bg_text]).to(x.dtype)

    def scores(ln_1_out):
        logits = backbone.last_block_scores(x, ln_1_out, text)
        return logits.float().masked_fill(absent, float("-inf")).softmax(-1)  # [B, T]

    # torch.func rather than torch.autograd: it runs under no_grad, and torch.compile traces it
    # without breaking the graph.
    activation = backbone.visual.transformer.resblocks[-1].ln_1(x)
    _, backward = torch.func.vjp(scores, activation)
    # Slot k of image b targets its class's score (not F.one_hot, which checks its input on
    # the host).
    classes = torch.arange(len(text), device=x.device)
    targets = ((pairs.classes[..., None] == classes) & pairs.valid[..., None]).to(x.dtype)
    grad, = torch.func.vmap(backward)(targets.transpose(0, 1))  # [K, B, 1+hw, D]
    weights = grad[:, :, 1:].float().mean(2).transpose(0, 1)  # [B, K, D]: channel weights
    cam = (weights @ activation[:, 1:].float().transpose(1, 2)).relu()  # [B, K, hw]
    return min_max(min_max(cam.view(b, k, *grid)))


def box_mask(cams: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """Union of the bounding boxes of the CAM's high regions, as the reference computes it.

    cams: [..., h, w] in [0, 1]. Quantise to uint8 (truncating), keep pixels strictly above
    int(threshold * max), box every 8-connected region as [x0, x0 + width) x [y0, y0 + height)
    with the exclusive end clipped to size - 1 (so a region touching the right or bottom border
    loses its last column or row). Returns [..., h, w] float 0/1; all zero where nothing passes.
    """
    shape = cams.shape
    h, w = shape[-2:]
    q = (cams.reshape(-1, h, w) * 255).to(torch.uint8).long()
    # In float64, as the reference's Python int(threshold * max) is.
    thresh = (threshold * q.amax((1, 2), keepdim=True).double()).long()
    fg = (q > thresh).flatten(1)  # [M, hw]
    reach = _reachable(fg, h, w)  # [M, hw, hw]: pixel j in pixel i's region

    # Each foreground pixel's region's box, from the coordinates of the pixels it reaches.
    ys = torch.arange(h, device=cams.device).repeat_interleave(w)
    xs = torch.arange(w, device=cams.device).repeat(h)

    y0, y1 = ys.where(reach, h).amin(-1), (ys.where(reach, -1).amax(-1) + 1).clamp(max=h - 1)
    x0, x1 = xs.where(reach, w).amin(-1), (xs.where(reach, -1).amax(-1) + 1).clamp(max=w - 1)
    # Row y and column x of the grid inside pixel i's box: [M, h, hw] and [M, w, hw].
    yr = torch.arange(h, device=cams.device).view(1, h, 1)
    xr = torch.arange(w, device=cams.device).view(1, w, 1)
    rows = (yr >= y0[:, None]) & (yr < y1[:, None]) & fg[:, None]
    cols = (xr >= x0[:, None]) & (xr < x1[:, None])
    mask = torch.bmm(rows.float(), cols.float().transpose(1, 2)) > 0
    return mask.to(cams.dtype).reshape(shape)


def _reachable(fg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Which foreground pixels are 8-connected to which: [M, hw] bool -> [M, hw, hw] bool.

    Reachability by squaring the adjacency (with self-loops) of the foreground pixels: after s
    squarings it holds every path of up to 2**s steps, and a shortest path inside a region of
    an h x w grid has at most hw - 1 steps, so ceil(log2(hw - 1)) squarings reach the fixed
    point. A fixed number of batched matrix products: nothing is read back on the host.
    """
    y = torch.arange(h, device=fg.device).repeat_interleave(w)
    x = torch.arange(w, device=fg.device).repeat(h)
    near = ((y[:, None] - y).abs() <= 1) & ((x[:, None] - x).abs() <= 1)  # [hw, hw]
    edges = (near & fg[:, :, None] & fg[:, None, :]).float()
    for _ in range(math.ceil(math.log2(max(h * w - 1, 1)))):
        edges = torch.bmm(edges, edges).clamp_(max=1)  # sums of 0/1 paths: 1 where any
    return edges > 0
