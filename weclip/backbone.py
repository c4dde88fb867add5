"""The frozen CLIP: open_clip's ViT run block by block, at any input size (docs/method.md,
section 2).

open_clip's ``VisionTransformer.forward`` neither resizes its positional embeddings nor returns
attention weights, so this module runs the tower's parts itself: patch embedding, positional
embeddings resized to the input's grid, blocks 1..N-1 without gradient (keeping every block's
tokens and head-averaged attention), and block N again with gradient for Grad-CAM.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from torch import nn

from .batch import BackboneFeatures
from .config import NORMALIZATION, ModelConfig
from .model_configs import register_model_configs
from .weights import is_weight_file, resolve_weights

# Keys that OpenAI's TorchScript archives carry besides the weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

def pixel_statistics(stats: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) [3, 1, 1] of ``stats`` on the 0-255 scale."""
    if stats not in NORMALIZATION:
        raise ValueError(f"normalization must be one of {list(NORMALIZATION)}, not {stats!r}")
    return tuple(torch.tensor(v).view(3, 1, 1) for v in NORMALIZATION[stats])


def normalize(images: torch.Tensor, stats: str = "imagenet") -> torch.Tensor:
    """[..., 3, H, W] on the 0-255 scale (any dtype, on the CPU) -> float, normalised with
    ``stats``. ``FrozenCLIP.normalize`` does the same on the backbone's device."""
    mean, std = pixel_statistics(stats)
    return (images.float() - mean) / std


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


def weights_digest(module: nn.Module) -> str:
    """A digest of ``module``'s weights (names and bytes): which frozen backbone this is."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def create_clip(arch: str, weights: str | None = None) -> nn.Module:
    """An open_clip model of config ``arch`` with weights from a file, a pretrained tag, or none.

    ``weights``: None (random, the same every time), a path to a local file (see
    ``load_state_dict``), or an open_clip pretrained tag such as 'openai' (downloaded through
    open_clip's hub code, or taken from its cache without a network).
    """
    register_model_configs()
    if weights is None:
        # Seeded, so that a model trained on a random CLIP (tests, benchmarks) can be rebuilt.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return open_clip.create_model(arch)
    if is_weight_file(weights):
        weights = resolve_weights(weights)
        # open_clip warns through the root logger that the model is initialized randomly,
        # true only until the file's weights are loaded below.
        def not_random_init(record):
            return not record.getMessage().startswith("No pretrained weights loaded")

        logging.getLogger().addFilter(not_random_init)
        try:
            model = open_clip.create_model(arch)
        finally:
            logging.getLogger().removeFilter(not_random_init)
        state_dict = load_state_dict(weights)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"{weights}: weights do not fit open_clip config {arch!r}: {e}") from None
        return model
    if weights not in open_clip.list_pretrained_tags_by_model(arch):
        raise ValueError(f"{weights!r} is neither a file nor an open_clip pretrained tag of {arch!r}")
    return _pretrained(arch, weights)


def _pretrained(arch: str, tag: str) -> nn.Module:
    """open_clip's ``arch`` with the weights of ``tag``, downloaded or from the hub's cache.

    Without a network the hub's retries take a minute to give up; its host is asked first (5 s),
    and an unreachable one means the cached copy, or an error that says what to do.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")
                                 if hub else cfg.get("url", "")).hostname
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if host and not offline and not _reachable(host):
        repo, name = os.path.split(hub)
        for filename in ("open_clip_model.safetensors", name or "open_clip_pytorch_model.bin"):
            cached = hub and try_to_load_from_cache(repo, filename)
            if isinstance(cached, str):
                return create_clip(arch, cached)
        raise ValueError(f"model.weights: {tag!r}: {host} cannot be reached to download the "
                         f"{arch} weights, and no copy is cached; run once where it can, or give "
                         "a local weight file (model.weights: path/to/weights.pt)")
    try:
        return open_clip.create_model(arch, pretrained=tag)
    except Exception as e:  # the hub and open_clip raise many types
        raise ValueError(f"model.weights: {tag!r}: the {arch} weights could not be loaded "
                         f"({type(e).__name__}: {e}); give a local weight file "
                         "(model.weights: path/to/weights.pt)") from None


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def attention(attn: nn.MultiheadAttention, x: torch.Tensor, need_weights: bool):
    """Self-attention of an open_clip block (its ``attn``, a batch-first nn.MultiheadAttention
    in open_clip 2.24 to 3.x) on [B, L, D] tokens.

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


def run_block(block: open_clip.transformer.ResidualAttentionBlock, x: torch.Tensor,
              need_weights: bool = False, ln_1_out: torch.Tensor | None = None):
    """One open_clip ResidualAttentionBlock on [B, L, D] tokens.

    ``ln_1_out`` replaces ``block.ln_1(x)`` (Grad-CAM differentiates with respect to it).
    Returns (tokens [B, L, D], head-averaged attention [B, L, L] or None).
    """
    h = block.ln_1(x) if ln_1_out is None else ln_1_out
    out, weights = attention(block.attn, h, need_weights)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights


def resized_positional_embedding(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The image tower's positional embeddings, the patches' resized bilinearly to ``grid``:
    [1 + h*w, D], the class token's first."""
    pos = visual.positional_embedding
    g0, g1 = visual.grid_size
    if (g0, g1) == tuple(grid):
        return pos
    patch = pos[1:].T.reshape(1, -1, g0, g1)
    patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patch.flatten(2)[0].T])


def embed(visual: nn.Module, images: torch.Tensor,
          keep: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's image tower up to its blocks: patch and positional embeddings, class token,
    ln_pre.

    images: normalised [B, 3, H, W], cut into an h x w = (H // patch, W // patch) grid of
    patches; keep: long [B, K], the patches to keep (FLIP's patch dropout), or None for all
    K = h*w. Returns tokens [B, 1+K, D], the class token first.
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    pos = resized_positional_embedding(visual, tuple(x.shape[-2:])).to(x.dtype)
    # Positions are added before the patches are dropped, so kept patches keep their own.
    x = x.flatten(2).transpose(1, 2) + pos[1:]
    if keep is not None:
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    cls_token = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls_token, x], 1))


class FrozenCLIP(nn.Module):
    """A frozen open_clip ViT: features for the decoder and CAM, and a text classifier.

    All weights are frozen and the model stays in eval mode whatever ``train()`` is called with.
    It takes images on the 0-255 scale and normalises them with its ``normalization`` statistics.
    """

    def __init__(self, clip: nn.Module, tokenizer, normalization: str = "imagenet"):
        super().__init__()
        mean, std = pixel_statistics(normalization)
        self.normalization = normalization
        # Buffers, so that they live on the model's device: no copy from the host per call.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        if not isinstance(getattr(clip, "visual", None), open_clip.transformer.VisionTransformer):
            raise ValueError("WeCLIP needs an open_clip ViT image tower (VisionTransformer)")
        if clip.visual.attn_pool is not None:
            raise ValueError("open_clip configs with attentional pooling are not supported")
        self.clip = clip
        self.tokenizer = tokenizer
        self.clip.requires_grad_(False)
        self.clip.eval()
        self._digest = None

    @classmethod
    def from_config(cls, config: ModelConfig) -> "FrozenCLIP":
        """The frozen CLIP of a model configuration: its arch, weights and normalization."""
        return cls(create_clip(config.arch, config.weights), open_clip.get_tokenizer(config.arch),
                   config.normalization)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[..., 3, H, W] on the 0-255 scale -> normalised float, as this backbone takes them."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def digest(self) -> str:
        """A digest of the image tower's weights as loaded: which frozen CLIP this is (kept
        from the first call, so that a backbone cast to bfloat16 keeps its identity)."""
        if self._digest is None:
            self._digest = weights_digest(self.visual)
        return self._digest

    def cast_blocks(self, dtype: torch.dtype) -> "FrozenCLIP":
        """Cast the image tower up to block N-1 to ``dtype`` once (mixed-precision training,
        instead of autocast casting the frozen weights at every step). Block N, ln_post and
        the projection stay in float32: Grad-CAM differentiates through them."""
        self.digest()
        v = self.visual
        for module in (v.conv1, v.ln_pre, *v.transformer.resblocks[:-1]):
            module.to(dtype)
        return self

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

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneFeatures:
        """Blocks 1..N without gradient on normalised images [B, 3, H, W] -> BackboneFeatures
        (block N's attention only).

        The grid is (H // patch, W // patch); pixels beyond a multiple of the patch are unused.
        """
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = embed(self.visual, images)
        blocks = self.visual.transformer.resblocks[:-1]
        tokens, attn = [], []
        for block in blocks:
            x, weights = run_block(block, x, need_weights=True)
            tokens.append(x)
            attn.append(weights)
        # Of block N only the attention is kept (Grad-CAM runs the block again).
        attn.append(self.last_attention(x))
        return BackboneFeatures(torch.stack(tokens, 1), torch.stack(attn, 1), grid)

    @torch.no_grad()
    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Block N's head-averaged attention [B, L, L] on tokens x [B, L, D] (in float32, like
        the block: ``cast_blocks``)."""
        last = self.visual.transformer.resblocks[-1]
        return attention(last.attn, last.ln_1(x.to(last.ln_1.weight.dtype)), need_weights=True)[1]

    def last_block_scores(self, x: torch.Tensor, ln_1_out: torch.Tensor,
                          text: torch.Tensor) -> torch.Tensor:
        """Block N on block N-1 tokens, then the CAM head (docs/method.md, section 4).

        x: [P, 1+hw, D] block N-1 output; ln_1_out: [P, 1+hw, D] block N's ln_1(x), the
        tensor that Grad-CAM differentiates; text: [T, E] L2-normalised text features.
        Returns logits [P, T] = exp(logit_scale) * cosine(mean patch feature, text).
        """
        v = self.visual
        x, _ = run_block(v.transformer.resblocks[-1], x, ln_1_out=ln_1_out)
        x = v.ln_post(x)[:, 1:].mean(1) @ v.proj
        return self.clip.logit_scale.exp() * F.normalize(x, dim=-1) @ text.T

    @torch.no_grad()
    def encode_text(self, names: list[str], template: str) -> torch.Tensor:
        """L2-normalised text features [len(names), E] of ``template`` filled with each name."""
        device = self.clip.logit_scale.device
        tokens = self.tokenizer([template.format(name) for name in names]).to(device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
