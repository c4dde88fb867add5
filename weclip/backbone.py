"""The frozen CLIP: open_clip's ViT run block by block, at any input size (METHOD.md section 2).

open_clip's ``VisionTransformer.forward`` neither resizes its positional embeddings nor returns
attention weights, so this module runs the tower's parts itself: patch embedding, positional
embeddings resized to the input's grid, blocks 1..N-1 without gradient (keeping every block's
tokens and head-averaged attention), and block N again with gradient for Grad-CAM.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .model_configs import register_model_configs

# Keys that OpenAI's TorchScript archives carry besides the weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


@dataclass
class BackboneFeatures:
    """What the frozen CLIP gives the rest of WeCLIP for a batch of B images on an h x w grid.

    tokens: [B, N-1, 1+hw, D] output tokens of blocks 1..N-1 (class token first)
    attn:   [B, N, 1+hw, 1+hw] head-averaged attention of blocks 1..N
    grid:   (h, w)
    """

    tokens: torch.Tensor
    attn: torch.Tensor
    grid: tuple[int, int]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a plain state dict (.pt/.pth/.bin), a .safetensors file or an OpenAI
    TorchScript archive, as one flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if _is_torchscript(path):
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: not a state dict (got {type(state_dict).__name__})")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if k not in _NON_WEIGHT_KEYS}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def create_clip(arch: str, weights: str | None = None) -> nn.Module:
    """An open_clip model of config ``arch`` with weights from a file, a pretrained tag, or none.

    ``weights``: None (random), a path to a local file (see ``load_state_dict``), or an
    open_clip pretrained tag such as 'openai' (downloads through open_clip's hub code; set
    HF_HUB_OFFLINE=1 to use its cache without network).
    """
    register_model_configs()
    if weights is None:
        return open_clip.create_model(arch)
    if Path(weights).suffix or Path(weights).exists():
        model = open_clip.create_model(arch)
        state_dict = load_state_dict(weights)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"{weights}: weights do not fit open_clip config {arch!r}: {e}") from None
        return model
    if weights not in open_clip.list_pretrained_tags_by_model(arch):
        raise ValueError(f"{weights!r} is neither a file nor an open_clip pretrained tag of {arch!r}")
    return open_clip.create_model(arch, pretrained=weights)


def attention(attn: nn.MultiheadAttention, x: torch.Tensor, need_weights: bool):
    """Self-attention of an open_clip block on [B, L, D] tokens.

    Returns (output [B, L, D], head-averaged weights [B, L, L] or None).
    """
    b, n, d = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, d // heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, d/heads]
    if need_weights:
        weights = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        out, mean_weights = weights @ v, weights.mean(1)
    else:
        out, mean_weights = F.scaled_dot_product_attention(q, k, v), None
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d)), mean_weights


def run_block(block: nn.Module, x: torch.Tensor, need_weights: bool = False, ln_1_out=None):
    """One open_clip ResidualAttentionBlock on [B, L, D] tokens.

    ``ln_1_out`` replaces ``block.ln_1(x)`` (Grad-CAM differentiates with respect to it).
    Returns (tokens [B, L, D], head-averaged attention [B, L, L] or None).
    """
    h = block.ln_1(x) if ln_1_out is None else ln_1_out
    out, weights = attention(block.attn, h, need_weights)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights


class FrozenCLIP(nn.Module):
    """A frozen open_clip ViT: features for the decoder and CAM, and a text classifier.

    All weights are frozen and the model stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, clip: nn.Module, tokenizer):
        super().__init__()
        if not isinstance(getattr(clip, "visual", None), open_clip.transformer.VisionTransformer):
            raise ValueError("WeCLIP needs an open_clip ViT image tower (VisionTransformer)")
        if clip.visual.attn_pool is not None:
            raise ValueError("open_clip configs with attentional pooling are not supported")
        self.clip = clip
        self.tokenizer = tokenizer
        self.clip.requires_grad_(False)
        self.clip.eval()

    @classmethod
    def from_config(cls, arch: str, weights: str | None = None) -> "FrozenCLIP":
        return cls(create_clip(arch, weights), open_clip.get_tokenizer(arch))

    def train(self, mode: bool = True):
        # Frozen means eval mode too: no dropout, no patch dropout.
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def visual(self):
        return self.clip.visual

    @property
    def depth(self) -> int:
        """N, the number of transformer blocks of the image tower."""
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def patch_size(self) -> int:
        return self.visual.conv1.kernel_size[0]

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embeddings resized bilinearly to ``grid``: [1 + h*w, D]."""
        pos = self.visual.positional_embedding
        g0, g1 = self.visual.grid_size
        if (g0, g1) == tuple(grid):
            return pos
        patch = pos[1:].T.reshape(1, -1, g0, g1)
        patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([pos[:1], patch.flatten(2)[0].T])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneFeatures:
        """Blocks 1..N without gradient on normalised images [B, 3, H, W] -> BackboneFeatures.

        The grid is (H // patch, W // patch); pixels beyond a multiple of the patch are unused.
        """
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls_token = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + self.positional_embedding(grid).to(x.dtype)
        x = v.ln_pre(x)
        tokens, attn = [], []
        for block in v.transformer.resblocks:
            x, weights = run_block(block, x, need_weights=True)
            tokens.append(x)
            attn.append(weights)
        return BackboneFeatures(torch.stack(tokens[:-1], 1), torch.stack(attn, 1), grid)

    def last_block_scores(self, x: torch.Tensor, ln_1_out: torch.Tensor,
                          text: torch.Tensor) -> torch.Tensor:
        """Block N on block N-1 tokens, then the CAM head (METHOD.md section 4).

        x: [P, 1+hw, D] block N-1 output; ln_1_out: [P, 1+hw, D] block N's ln_1(x), the
        tensor that Grad-CAM differentiates; text: [T, E] L2-normalised text features.
        Returns logits [P, T] = exp(logit_scale) * cosine(mean patch feature, text).
        """
        v = self.visual
        x, _ = run_block(v.transformer.resblocks[-1], x, ln_1_out=ln_1_out)
        x = v.ln_post(x)[:, 1:].mean(1) @ v.proj
        return self.clip.logit_scale.exp() * F.normalize(x, dim=-1) @ text.T

    @torch.no_grad()
    def encode_text(self, names: list[str], template: str = "a clean origami {}.") -> torch.Tensor:
        """L2-normalised text features [len(names), E] of ``template`` filled with each name."""
        device = self.clip.logit_scale.device
        tokens = self.tokenizer([template.format(name) for name in names]).to(device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
