"""The trainable decoder on frozen tokens, and its affinity map (docs/method.md, sections 3 and 10).

Two parts: ``LevelFusion`` turns the tokens of one or more levels into the fused feature map F_u,
and ``SegmentationHead`` turns a feature map into class logits. WeCLIP fuses the CLIP's blocks
1..N-1 (``Decoder``); WeCLIP+ fuses the CLIP's last kept block and the DINO's tokens each on
their own, and one head segments both (``PlusDecoder``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer on [B, L, dim] tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), QuickGELU(),
                                 nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class LevelFusion(nn.Module):
    """Each level's tokens through its own MLP (Linear, ReLU, Linear), the levels concatenated,
    then a 1x1 conv and Dropout2d: the fused feature map F_u."""

    def __init__(self, in_dim: int, levels: int, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.level_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
            for _ in range(levels))
        self.fuse = nn.Conv2d(dim * levels, dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens: [B, levels, hw, in_dim] patch tokens, grid (h, w) -> F_u [B, dim, h, w]."""
        b = tokens.shape[0]
        levels = [mlp(tokens[:, i].float()) for i, mlp in enumerate(self.level_mlps)]
        x = torch.cat(levels, dim=-1).transpose(1, 2).reshape(b, -1, *grid)
        return self.dropout(self.fuse(x))


class SegmentationHead(nn.Module):
    """Transformer layers on a feature map's tokens, then a 1x1 conv to the classes."""

    def __init__(self, dim: int, num_classes: int, layers: int = 3, heads: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(layers))
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """fused: [B, dim, h, w] -> logits [B, num_classes, h, w]."""
        b, _, h, w = fused.shape
        x = fused.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.transpose(1, 2).reshape(b, -1, h, w))


class Decoder(nn.Module):
    """WeCLIP's decoder: the CLIP's blocks 1..N-1 fused, then segmented."""

    def __init__(self, in_dim: int, levels: int, num_classes: int, dim: int = 256,
                 layers: int = 3, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.fusion = LevelFusion(in_dim, levels, dim, dropout)
        self.head = SegmentationHead(dim, num_classes, layers, heads)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]):
        """tokens: [B, levels, hw, in_dim] patch tokens (class token dropped), grid (h, w).

        Returns (logits [B, num_classes, h, w], F_u [B, dim, h, w]).
        """
        fused = self.fusion(tokens, grid)
        return self.head(fused), fused


class PlusDecoder(nn.Module):
    """WeCLIP+'s decoder: the CLIP's tokens and the DINO's fused each on their own, the DINO's
    map resized to the CLIP's grid, and one head that segments both."""

    def __init__(self, clip_dim: int, dino_dim: int, num_classes: int, dim: int = 256,
                 layers: int = 3, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.clip = LevelFusion(clip_dim, 1, dim, dropout)
        self.dino = LevelFusion(dino_dim, 1, dim, dropout)
        self.head = SegmentationHead(dim, num_classes, layers, heads)

    def forward(self, clip_tokens: torch.Tensor, grid: tuple[int, int],
                dino_tokens: torch.Tensor, dino_grid: tuple[int, int]):
        """clip_tokens: [B, 1, hw, D]; dino_tokens: [B, 1, h'w', D'] on the DINO's grid.

        Returns (CLIP logits, DINO logits, each [B, num_classes, h, w]; the two maps F_u
        concatenated, [B, 2 dim, h, w]).
        """
        clip = self.clip(clip_tokens, grid)
        dino = F.interpolate(self.dino(dino_tokens, dino_grid), size=grid, mode="bilinear",
                             align_corners=False)
        return self.head(clip), self.head(dino), torch.cat([clip, dino], 1)


def affinity(fused: torch.Tensor) -> torch.Tensor:
    """A_f = sigmoid(F_u^T F_u): [B, dim, h, w] -> [B, hw, hw]."""
    x = fused.flatten(2)
    return torch.sigmoid(x.transpose(1, 2) @ x)
