"""Initial CAMs by Grad-CAM on the frozen CLIP, and their box masks (docs/method.md, sections 4-5).

CAMs are computed for (image, class) pairs: one pair per foreground class present in an image.
``PresentClasses`` lays the pairs out once, on the CPU where the labels come from, so that the
training step needs no device-to-host copy to know which classes each image has.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import FrozenCLIP


@dataclass
class PresentClasses:
    """The (image, class) pairs of a batch.

    image: [P] index of the pair's image in the batch
    klass: [P] foreground class index (0-based; segmentation id = klass + 1)
    slot:  [P] rank of the pair among its image's pairs
    width: max pairs in one image (K)
    """

    image: torch.Tensor
    klass: torch.Tensor
    slot: torch.Tensor
    width: int

    @classmethod
    def from_labels(cls, labels: torch.Tensor, device=None) -> "PresentClasses":
        """labels: [B, C] multi-hot over foreground classes (best kept on the CPU)."""
        present = labels.detach().cpu() > 0
        if not present.any(1).all():
            raise ValueError("every image needs at least one foreground class label")
        image, klass = present.nonzero(as_tuple=True)
        slot = present.long().cumsum(1)[image, klass] - 1
        width = int(present.sum(1).max())
        move = dict(device=device, non_blocking=True)
        return cls(image.to(**move), klass.to(**move), slot.to(**move), width)

    def __len__(self) -> int:
        return len(self.image)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale each map of [..., h, w] to [0, 1]: (x - min) / (max + 1e-7) after the shift."""
    x = x - x.amin((-2, -1), keepdim=True)
    return x / (x.amax((-2, -1), keepdim=True) + 1e-7)


def grad_cam(backbone: FrozenCLIP, last_tokens: torch.Tensor, grid: tuple[int, int],
             pairs: PresentClasses, labels: torch.Tensor, fg_text: torch.Tensor,
             bg_text: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every (image, class) pair in one backward pass.

    last_tokens: [B, 1+hw, D] block N-1 output; labels: [B, C] multi-hot; fg_text: [C, E],
    bg_text: [G, E] normalised text features. Each pair gets its own copy of block N, so one
    backward of the summed target scores yields every pair's gradient exactly as if it had been
    computed alone. The softmax runs over the image's present classes and all background words.
    The CAM is min-max scaled twice, as the authors' Grad-CAM library does (docs/method.md,
    section 4), so each map peaks at 1 (to within the 1e-7 guard). Returns CAMs [P, h, w].
    """
    x = last_tokens[pairs.image].detach().float()
    present = labels.to(x.device)[pairs.image] > 0
    text = torch.cat([fg_text, bg_text]).to(x.dtype)
    with torch.enable_grad():
        ln_1_out = backbone.visual.transformer.resblocks[-1].ln_1(x).detach().requires_grad_(True)
        logits = backbone.last_block_scores(x, ln_1_out, text)
        absent = F.pad(~present, (0, len(bg_text)), value=False)
        scores = logits.float().masked_fill(absent, float("-inf")).softmax(-1)
        target = scores.gather(1, pairs.klass[:, None]).sum()
        grad, = torch.autograd.grad(target, ln_1_out)
    activation, grad = ln_1_out.detach()[:, 1:].float(), grad[:, 1:].float()
    weights = grad.mean(1, keepdim=True)  # [P, 1, D]: channel weights
    cam = (weights * activation).sum(-1).relu()
    return min_max(min_max(cam.view(-1, *grid)))


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
    region = _connected_components(q > thresh)  # [M, h, w], 0 = outside, else label in 1..hw

    # Per label: its rows and columns' extent, by scatter over the flattened grid.
    m = region.shape[0]
    ys = torch.arange(h, device=cams.device).view(1, h, 1).expand(m, h, w).reshape(m, -1)
    xs = torch.arange(w, device=cams.device).view(1, 1, w).expand(m, h, w).reshape(m, -1)
    labels = region.reshape(m, -1)
    big = h * w + 1

    def extent(coords, reduce, init):
        out = torch.full((m, big), init, device=cams.device, dtype=torch.long)
        return out.scatter_reduce(1, labels, coords, reduce=reduce)[:, 1:]  # drop label 0

    y0, y1 = extent(ys, "amin", big), (extent(ys, "amax", -1) + 1).clamp(max=h - 1)
    x0, x1 = extent(xs, "amin", big), (extent(xs, "amax", -1) + 1).clamp(max=w - 1)
    yr = torch.arange(h, device=cams.device).view(1, h, 1)
    xr = torch.arange(w, device=cams.device).view(1, w, 1)
    rows = (yr >= y0[:, None]) & (yr < y1[:, None])  # [M, h, hw]: row y inside box of label
    cols = (xr >= x0[:, None]) & (xr < x1[:, None])  # [M, w, hw]
    mask = torch.bmm(rows.float(), cols.float().transpose(1, 2)) > 0
    return mask.to(cams.dtype).reshape(shape)


def _connected_components(fg: torch.Tensor) -> torch.Tensor:
    """8-connected labelling of [M, h, w] bool maps -> long labels (0 off, else max index + 1).

    Max-label propagation over 3x3 neighbourhoods with pointer jumping; stops at the fixed point.
    """
    m, h, w = fg.shape
    index = torch.arange(1, h * w + 1, device=fg.device).view(1, h, w)
    labels = torch.where(fg, index, 0)
    while True:
        grown = F.max_pool2d(labels[:, None].float(), 3, stride=1, padding=1)[:, 0].long()
        grown = torch.where(fg, grown, 0)
        # Jump to the label of the pixel that a label names: it lies in the same region.
        flat = grown.view(m, -1)
        jumped = flat.gather(1, (flat - 1).clamp(min=0)).view(m, h, w)
        grown = torch.where(fg, torch.maximum(grown, jumped), 0)
        if torch.equal(grown, labels):
            return labels
        labels = grown
