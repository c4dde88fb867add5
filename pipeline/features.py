"""The feature cache's store: the frozen CLIP's tokens and attention of a split in zarr.

The backbone is frozen, so its output for a given input never changes. The cache stage
(``pipeline.cache.write_cache``) runs it once over a *fixed view* of every image (the image
resized bilinearly to size x size) and stores what WeCLIP needs from it; ``CachedFeatures``
reads that back for training (``train.features: cache``) instead of running blocks 1..N every
step.

The trade-off: a cached run sees the same fixed view of each image in every epoch, so it trains
without the paper's random rescale, flip and crop (and the square resize changes the aspect
ratio), but an epoch costs only the decoder and the last block after one backbone pass. The
online run (``train.features: online``) keeps the paper's augmentation.

Layout of the zarr v3 group, for n images, C classes, N blocks, L = 1 + h*w tokens, width D:

    tokens  float16 [n, N-1, L, D]     blocks 1..N-1 output tokens (class token first)
    attn    float16 [n, N, L, L]       head-averaged attention of blocks 1..N
    images  uint8   [n, 3, size, size] the exact view the backbone saw (PAR needs the pixels)
    labels  uint8   [n, C]             multi-hot image-level labels
    done    bool    [n]                rows whose data is fully written (a chunk per shard)
    attributes: format, arch (depth, width, patch_size, grid, a digest of the image tower's
                weights, its pixel statistics), size, split, count, classes, image_ids

``tokens``, ``attn`` and ``images`` hold one compressed (blosc + zstd) chunk per image inside
one shard file per ``shard_size`` images, so a split is a few hundred files that DVC can track
(VOC train_aug: 3 x 166 shards, 1 + 166 small chunks and 6 metadata files).

Disk size (``estimate_bytes``): VOC train_aug (10,582 images) with ViT-B/16 at 320 x 320
(N = 12, D = 768, grid 20 x 20, L = 401) takes 10,941,720 bytes per image in float16 before
compression (tokens 6,775,296 + attention 3,859,224 + pixels 307,200), 115.8 GB (107.8 GiB)
for the split. How much compression saves on real CLIP activations is not measured here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from weclip.backbone import FrozenCLIP
from weclip.batch import BackboneFeatures, Sample

FORMAT = "weclip-feature-cache/2"
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


def backbone_attributes(backbone: FrozenCLIP) -> dict:
    """What identifies the backbone's features: architecture, a digest of its image tower's
    weights and the pixel statistics it normalises with."""
    return {"depth": backbone.depth, "width": backbone.width, "patch_size": backbone.patch_size,
            "weights": backbone.digest(), "normalization": backbone.normalization}


def open_store(path: Path, mode: str = "r") -> zarr.Group:
    """The store at ``path``; one that is missing or cannot be read is an error naming it."""
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a feature cache (no zarr group)") from None
    except Exception as e:  # zarr raises many types for damaged metadata
        raise ValueError(f"{path}: not a readable feature cache ({type(e).__name__}: {e}); "
                         "delete it to write it again") from None


def create_store(path: Path, attributes: dict, labels: np.ndarray, depth: int, width: int,
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
    group.create_array("done", shape=(n,), dtype="bool", chunks=(shard_size,), fill_value=False)
    partial.rename(path)


class CachedFeatures(torch.utils.data.Dataset):
    """A finished feature cache as a dataset.

    Items are ``Sample``s: the fixed view uint8 [3, S, S], labels [C], index, and features of
    tokens float16 [N-1, L, D] and attn float16 [N, L, L]; ``Batch.collate`` stacks them for
    ``WeCLIP(images, labels, features=...)``. With ``backbone``, a cache made by another
    architecture, other weights or other pixel statistics is refused.
    """

    def __init__(self, path: str | Path, backbone: FrozenCLIP | None = None):
        self.path = Path(path)
        self.group = open_store(self.path)
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
        self.image_ids = attrs["image_ids"]
        self.labels = torch.from_numpy(self.group["labels"][:]).float()

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def most_labels(self) -> int:
        """The most class labels of one image: the default slots per image of a batch."""
        return int(self.labels.sum(1).max())

    def __getitem__(self, index: int) -> Sample:
        features = BackboneFeatures(torch.from_numpy(self.group["tokens"][index]),
                                    torch.from_numpy(self.group["attn"][index]), self.grid)
        return Sample(torch.from_numpy(self.group["images"][index]), self.labels[index], index,
                      features=features)
