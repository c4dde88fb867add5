"""Refining CAMs with attention: static refinement and the RFM (docs/method.md, section 5).

All attention maps here are head-averaged with the class token's row and column dropped.
"""
from __future__ import annotations

import torch


def transition_matrix(attn: torch.Tensor) -> torch.Tensor:
    """Attention [..., N, N] -> symmetric transition matrix [..., N, N].

    Normalise columns then rows, twice more, symmetrise, then take one random-walk step
    (T @ T).
    """
    t = attn
    for _ in range(3):
        t = t / t.sum(-2, keepdim=True)
        t = t / t.sum(-1, keepdim=True)
    t = (t + t.transpose(-2, -1)) / 2
    return t @ t


def scaled_layers(depth: int, of_12: int) -> int:
    """The paper's layer count for ViT-B's 12 blocks (8 static, 6 RFM), scaled to ``depth``."""
    return max(1, round(depth * of_12 / 12))


def static_attention(attn: torch.Tensor, last: int = 8) -> torch.Tensor:
    """The mean of the last ``last`` maps: attn [B, L, N, N] -> [B, N, N]."""
    return attn[:, -last:].mean(1)


def select_attention(attn: torch.Tensor, affinity: torch.Tensor, last: int = 6,
                     signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The RFM: keep the maps that agree with the decoder's affinity, weighted by it.

    attn: [B, L, N, N]; affinity: [B, N, N] (A_f, detached here). For each of the last ``last``
    maps, S = sum over entries of (A_f - map), or of |A_f - map| when ``signed`` is False (the
    paper's formula; the reference code uses the signed sum). Keep maps with S <= mean S.
    Returns (R = mean of kept maps * A_f [B, N, N], keep [B, last] bool).
    """
    affinity = affinity.detach()
    maps = attn[:, -last:]
    diff = affinity[:, None] - maps
    if not signed:
        diff = diff.abs()
    score = diff.flatten(2).sum(-1)  # [B, last]
    keep = score <= score.mean(1, keepdim=True)
    kept = (maps * keep[..., None, None]).sum(1) / (keep.sum(1)[:, None, None] + 1e-5)
    return kept * affinity, keep


def refine_cams(cams: torch.Tensor, masks: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """Propagate each CAM through its image's transition matrix, restricted to its box mask.

    cams, masks: [B, K, h, w], the K CAMs of each image; transition: [B, hw, hw].
    (T * mask as a row vector) @ cam equals T @ (mask * cam). Returns [B, K, h, w], not rescaled.
    """
    b, k, h, w = cams.shape
    source = (cams * masks).reshape(b, k, h * w).transpose(1, 2)  # [B, hw, K]
    return torch.bmm(transition.to(source.dtype), source).transpose(1, 2).reshape(b, k, h, w)
