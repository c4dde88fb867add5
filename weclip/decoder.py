"""The trainable decoder on frozen CLIP tokens, and its affinity map (docs/method.md, section 3)."""
from __future__ import annotations

import torch
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


class Decoder(nn.Module):
    """Fuse the patch tokens of blocks 1..N-1 and predict logits.

    Each level gets its own MLP (Linear, ReLU, Linear); the concatenated levels pass a 1x1 conv
    and Dropout2d to give F_u; transformer layers on F_u's tokens and a 1x1 conv give logits.
    """

    def __init__(self, in_dim: int, levels: int, num_classes: int, dim: int = 256,
                 layers: int = 3, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.level_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
            for _ in range(levels))
        self.fuse = nn.Conv2d(dim * levels, dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(layers))
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]):
        """tokens: [B, levels, hw, in_dim] patch tokens (class token dropped), grid (h, w).

        Returns (logits [B, num_classes, h, w], F_u [B, dim, h, w]).
        """
        b = tokens.shape[0]
        levels = [mlp(tokens[:, i].float()) for i, mlp in enumerate(self.level_mlps)]
        x = torch.cat(levels, dim=-1).transpose(1, 2).reshape(b, -1, *grid)
        fused = self.dropout(self.fuse(x))
        x = fused.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        logits = self.classifier(x.transpose(1, 2).reshape(b, -1, *grid))
        return logits, fused


def affinity(fused: torch.Tensor) -> torch.Tensor:
    """A_f = sigmoid(F_u^T F_u): [B, dim, h, w] -> [B, hw, hw]."""
    x = fused.flatten(2)
    return torch.sigmoid(x.transpose(1, 2) @ x)
