"""The frozen DINOv2 of WeCLIP+: timm's DINOv2 ViTs, giving the patch tokens of any input size as
the DINOv2 hub model computes them (docs/method.md, section 10).

timm builds the ViT and converts the official DINOv2 release's state dict on load (its
``checkpoint_filter_fn``). One thing differs from the hub model: for the models without
registers, the hub resamples the positional embeddings to the input's grid with a scale factor
offset by 0.1 and no antialiasing, and timm by the target size with antialiasing, which changes
the tokens; ``FrozenDINO`` resamples them as the hub does. (The register models resample by size
with antialiasing in both.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import load_state_dict, weights_digest
from .config import DinoConfig
from .model_configs import DINO_CONFIGS
from .weights import is_weight_file, resolve_weights


def create_dino(arch: str, weights: str | None = None) -> nn.Module:
    """timm's DINOv2 ViT ``arch`` (or one of ``DINO_CONFIGS``) with weights from a file in the
    official DINOv2 format (or timm's), a timm pretrained tag ('lvd142m'), or none (random, the
    same every time)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    base, options = DINO_CONFIGS.get(arch, (arch, {}))
    if base not in timm.list_models("*dinov2*"):
        raise ValueError(f"{arch!r} is not a DINOv2 ViT of timm (see timm.list_models('*dinov2*'))")
    build = dict(num_classes=0, dynamic_img_size=True, **options)
    if weights is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return timm.create_model(base, pretrained=False, **build)
    if is_weight_file(weights):
        model = timm.create_model(base, pretrained=False, **build)
        state_dict = checkpoint_filter_fn(load_state_dict(resolve_weights(weights)), model)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"{weights}: weights do not fit the DINOv2 ViT {arch!r}: {e}") from None
        return model
    try:
        return timm.create_model(f"{base}.{weights}", pretrained=True, **build)
    except Exception as e:  # the hub and timm raise many types
        raise ValueError(f"model.dino.weights: {weights!r}: the {arch} weights could not be "
                         f"loaded ({type(e).__name__}: {e}); give a local weight file") from None


class FrozenDINO(nn.Module):
    """A frozen DINOv2 ViT: the normalised patch tokens of its last block (the hub model's
    ``x_norm_patchtokens``) for images resized to a multiple of its patch."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit.requires_grad_(False).eval()
        self._digest = None

    @classmethod
    def from_config(cls, config: DinoConfig) -> "FrozenDINO":
        return cls(create_dino(config.arch, config.weights))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # frozen means eval mode too
        return self

    @property
    def width(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def digest(self) -> str:
        """A digest of the weights as loaded: which DINOv2 this is."""
        if self._digest is None:
            self._digest = weights_digest(self.vit)
        return self._digest

    def cast(self, dtype: torch.dtype) -> "FrozenDINO":
        """Cast the ViT to ``dtype`` once (mixed-precision training, instead of autocast casting
        the frozen weights at every step); nothing differentiates through it."""
        self.digest()
        self.vit.to(dtype)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised images [B, 3, H, W], resized (bilinear) to the multiple of the patch below
        -> (patch tokens [B, h*w, D], the grid (h, w) = (H // patch, W // patch))."""
        p = self.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        x = F.interpolate(images, size=(grid[0] * p, grid[1] * p), mode="bilinear",
                          align_corners=False)
        v = self.vit
        x = v.patch_embed(x.to(v.patch_embed.proj.weight.dtype))  # [B, h, w, D]
        x = v._pos_embed(x) if v.no_embed_class else self._hub_pos_embed(x)
        x = v.norm(v.blocks(v.norm_pre(x)))
        return x[:, v.num_prefix_tokens:], grid

    def _hub_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The class token prepended and the positional embeddings added, the patches'
        resampled to x's grid as DINOv2's hub code does: bicubic, scale factor (grid + 0.1) / M
        for the M x M grid they were learned on, no antialiasing, none at M x M itself."""
        b, h, w, d = x.shape
        pos = self.vit.pos_embed
        patches = pos[:, 1:]
        m = math.isqrt(patches.shape[1])
        if (h, w) != (m, m):
            patches = patches.reshape(1, m, m, d).permute(0, 3, 1, 2).float()
            patches = F.interpolate(patches, scale_factor=((h + 0.1) / m, (w + 0.1) / m),
                                    mode="bicubic", align_corners=False, antialias=False)
            patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, d).to(pos.dtype)
        x = torch.cat([self.vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], 1)
        return x + torch.cat([pos[:, :1], patches], 1)
