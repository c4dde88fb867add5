"""The feature cache: the frozen CLIP's tokens and attention of a split, written once to zarr.

The backbone is frozen, so its output for a given input never changes. ``write_cache`` runs it
once over a *fixed view* of every image (the image resized bilinearly to size x size) and
stores what WeCLIP needs from it; ``CachedFeatures`` reads that back for training
(``train.features: cache``) instead of running blocks 1..N every step.

The trade-off: a cached run sees the same fixed view of each image in every epoch, so it trains
without the paper's random rescale, flip and crop (and the square resize changes the aspect
ratio), but an epoch costs only the decoder and the last block after one backbone pass. The
online run (``train.features: online``) keeps the paper's augmentation.

Layout of the zarr v3 group, for n images, C classes, N blocks, L = 1 + h*w tokens, width D:

    tokens  float16 [n, N-1, L, D]     blocks 1..N-1 output tokens (class token first)
    attn    float16 [n, N, L, L]       head-averaged attention of blocks 1..N
    images  uint8   [n, 3, size, size] the exact view the backbone saw (PAR needs the pixels)
    labels  uint8   [n, C]             multi-hot image-level labels
    done    bool    [n]                rows whose data is fully written
    attributes: format, arch (depth, width, patch_size, grid, a digest of the image tower's
                weights), size, normalization, split, count, classes, image_ids

``tokens``, ``attn`` and ``images`` hold one compressed (blosc + zstd) chunk per image inside
one shard file per ``shard_size`` images, so a split is a few hundred files that DVC can track
(VOC train_aug: 3 x 166 shards, 2 small chunks and 6 metadata files).
Rows are computed and written a whole shard at a time (writing part of a shard would rewrite
the shard file), and ``done`` is set only after a shard's data is on disk, so an interrupted write
resumes at the first unfinished shard.

Disk size (``estimate_bytes``): VOC train_aug (10,582 images) with ViT-B/16 at 320 x 320
(N = 12, D = 768, grid 20 x 20, L = 401) takes 10,941,720 bytes per image in float16 before
compression (tokens 6,775,296 + attention 3,859,224 + pixels 307,200), 115.8 GB (107.8 GiB)
for the split. How much compression saves on real CLIP activations is not measured here.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from tqdm import tqdm
from zarr.codecs import BloscCodec

from weclip.backbone import BackboneFeatures, FrozenCLIP
from weclip.dataset import (NORMALIZATION, load_image, multi_hot, normalize, read_classes,
                            read_manifest)

FORMAT = "weclip-feature-cache/1"
# Byte shuffle groups the float16 high bytes (sign, exponent), which is what compresses.
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def estimate_bytes(depth: int, width: int, grid: tuple[int, int], count: int = 1, *,
                   patch_size: int = 16) -> int:
    """Uncompressed bytes of the per-image arrays (tokens, attn, images) for ``count`` images."""
    tokens = 1 + grid[0] * grid[1]
    per_image = (2 * (depth - 1) * tokens * width  # float16 tokens
                 + 2 * depth * tokens * tokens  # float16 attention
                 + 3 * grid[0] * patch_size * grid[1] * patch_size)  # uint8 pixels
    return per_image * count


def fixed_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """A [3, H, W] 0-255 image resized bilinearly to uint8 [3, size, size].

    Rounded to uint8 before the backbone sees it, so the stored pixels are exactly its input.
    """
    view = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return view.round().clamp(0, 255).to(torch.uint8)


def backbone_attributes(backbone: FrozenCLIP) -> dict:
    """What identifies the backbone's features: architecture and a digest of its image tower."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in backbone.visual.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"depth": backbone.depth, "width": backbone.width,
            "patch_size": backbone.patch_size, "weights": digest.hexdigest()}


def write_cache(backbone: FrozenCLIP, dataset_root: str | Path, split: str,
                out_path: str | Path, *, size: int, normalization: str = "imagenet",
                batch_size: int = 8, device: str = "cpu", progress: bool = True,
                shard_size: int = 64, overwrite: bool = False) -> Path:
    """Cache the backbone's features of every image of ``split`` at ``out_path``; returns it.

    Resumes a store with the same attributes, skipping its finished rows. A store made with
    other settings (size, backbone, split contents...) is refused, or rebuilt if ``overwrite``.
    The backbone is moved to ``device``; it runs ``batch_size`` images at a time, and one shard
    of features (``shard_size`` images) is held in memory before it is written.
    """
    out_path = Path(out_path)
    if normalization not in NORMALIZATION:  # before a store is made with it
        raise ValueError(f"normalization must be one of {list(NORMALIZATION)}, "
                         f"not {normalization!r}")
    info = read_classes(dataset_root)
    records = read_manifest(dataset_root, split)
    if not records:
        raise ValueError(f"{dataset_root}: no images in split {split!r}")
    grid = size // backbone.patch_size
    attributes = {"format": FORMAT, **backbone_attributes(backbone), "grid": [grid, grid],
                  "size": size, "normalization": normalization, "split": split,
                  "count": len(records), "classes": info.classes,
                  "image_ids": [r.image_id for r in records]}
    if out_path.exists():
        existing = _open(out_path).attrs
        differing = [k for k, v in attributes.items() if existing.get(k) != v]
        if differing and not overwrite:
            raise ValueError(f"{out_path}: existing feature cache was made with other "
                             f"{', '.join(differing)}; delete it or pass overwrite=True")
        if differing:
            shutil.rmtree(out_path)
    if not out_path.exists():
        labels = np.stack([multi_hot(r.labels, len(info.classes)).numpy() for r in records])
        _create(out_path, attributes, labels.astype(np.uint8), backbone.depth, backbone.width,
                shard_size)

    group = _open(out_path, mode="r+")
    done = group["done"][:]
    backbone.to(device)
    shard = group["tokens"].shards[0]  # the store's, whatever ``shard_size`` says on a resume
    with tqdm(total=len(records), initial=int(done.sum()), desc=f"cache {split}",
              unit="img", disable=not progress) as bar:
        for start in range(0, len(records), shard):
            stop = min(start + shard, len(records))
            if done[start:stop].all():
                continue
            views = torch.stack([fixed_view(load_image(r.image), size)
                                 for r in records[start:stop]])
            tokens, attn = [], []
            for batch in views.split(batch_size):
                features = backbone(normalize(batch.float(), normalization).to(device))
                tokens.append(features.tokens.half().cpu())
                attn.append(features.attn.half().cpu())
                bar.update(len(batch))
            group["images"][start:stop] = views.numpy()
            group["tokens"][start:stop] = torch.cat(tokens).numpy()
            group["attn"][start:stop] = torch.cat(attn).numpy()
            group["done"][start:stop] = True  # last: the rows count only once all is written
    return out_path


def _open(path: Path, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a feature cache (no zarr group)") from None


def _create(path: Path, attributes: dict, labels: np.ndarray, depth: int, width: int,
            shard_size: int) -> None:
    """An empty store with its labels, built beside ``path`` and renamed into place, so that an
    interruption here never leaves a half-made store behind."""
    (h, w), n, size = attributes["grid"], attributes["count"], attributes["size"]
    tokens = 1 + h * w
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.open_group(partial, mode="w", zarr_format=3, attributes=attributes)
    for name, row, dtype in [("tokens", (depth - 1, tokens, width), "float16"),
                             ("attn", (depth, tokens, tokens), "float16"),
                             ("images", (3, size, size), "uint8")]:
        group.create_array(name, shape=(n, *row), dtype=dtype, chunks=(1, *row),
                           shards=(shard_size, *row), compressors=COMPRESSOR)
    group.create_array("labels", data=labels, chunks=labels.shape, compressors=COMPRESSOR)
    group.create_array("done", shape=(n,), dtype="bool", chunks=(n,), fill_value=False)
    partial.rename(path)


class CachedFeatures(torch.utils.data.Dataset):
    """A finished feature cache as a dataset.

    Items: (image [3, S, S] float32 normalised, labels [C] float, index,
            tokens [N-1, L, D] float16, attn [N, L, L] float16).
    ``collate`` batches them for ``WeCLIP(images, labels, features=...)``. With ``backbone``,
    a cache made by another architecture or other weights is refused.
    """

    def __init__(self, path: str | Path, backbone: FrozenCLIP | None = None):
        self.path = Path(path)
        self.group = _open(self.path)
        attrs = dict(self.group.attrs)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a feature cache of format {FORMAT}")
        done = self.group["done"][:]
        if not done.all():
            raise ValueError(f"{self.path}: incomplete feature cache ({int(done.sum())} of "
                             f"{len(done)} images written); run the cache step again to finish it")
        if backbone is not None:
            differing = [k for k, v in backbone_attributes(backbone).items() if attrs[k] != v]
            if differing:
                raise ValueError(f"{self.path}: feature cache was made by a backbone with other "
                                 f"{', '.join(differing)}")
        self.grid = tuple(attrs["grid"])
        self.normalization = attrs["normalization"]
        self.image_ids = attrs["image_ids"]
        self.labels = torch.from_numpy(self.group["labels"][:]).float()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.group["images"][index]).float()
        return (normalize(image, self.normalization), self.labels[index], index,
                torch.from_numpy(self.group["tokens"][index]),
                torch.from_numpy(self.group["attn"][index]))

    def collate(self, items) -> tuple[torch.Tensor, torch.Tensor, BackboneFeatures]:
        """Items -> (images [B, 3, S, S], labels [B, C], BackboneFeatures in float32)."""
        images, labels, _, tokens, attn = zip(*items)
        features = BackboneFeatures(torch.stack(tokens).float(), torch.stack(attn).float(),
                                    self.grid)
        return torch.stack(images), torch.stack(labels), features
