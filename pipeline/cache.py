"""The cache stage: the frozen CLIP's tokens and attention of the train split, written once to
zarr (the store's layout: ``pipeline.features``).

Rows are computed and written a whole shard at a time (writing part of a shard would rewrite the
shard file), and ``done`` is set only after a shard's data is on disk, so an interrupted write
resumes with the unfinished shards. Under torchrun the ranks share the work: each computes and
writes every world-th shard (``distributed.shard``), and ``done`` has a chunk file per shard, so
no two ranks ever write the same file. Rank 0 alone checks, removes or creates the store while
the others wait; every rank returns only once all shards are written.
"""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weclip.backbone import FrozenCLIP
from weclip.factory import resolve_weights
from weclip.dataset import load_image, multi_hot, read_classes, read_manifest

from . import distributed
from .common import Stopped, exclusive, run_step, stop_requests
from .features import FORMAT, backbone_attributes, create_store, open_store
from .params import Params


def cache(params: Params, step=run_step) -> Path:
    """The stage: write ``cache.path`` when ``train.features`` is 'cache'; otherwise leave only
    a note there (DVC always has the stage). Returns the store's path. ``step`` runs the
    writing of each shard (``common.run_step``)."""
    path = Path(params.cache.path)
    skipped = path / "SKIPPED"
    if params.train.features != "cache":
        if distributed.is_main():
            path.mkdir(parents=True, exist_ok=True)
            skipped.write_text("train.features is 'online': no feature cache is needed\n")
        return path
    device = distributed.local_device(params.cache.device)
    distributed.init(device)
    if skipped.exists() and distributed.is_main():
        shutil.rmtree(path)
    m = params.model
    backbone = FrozenCLIP.from_config(m.arch, resolve_weights(m.weights), m.normalization)
    with exclusive(path) if distributed.is_main() else nullcontext():
        return write_cache(backbone, params.dataset_dir, params.train.split, path,
                           size=params.train.crop_size, batch_size=params.cache.batch_size,
                           device=device, step=step)


def fixed_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """A [3, H, W] 0-255 image resized bilinearly to uint8 [3, size, size].

    Rounded to uint8 before the backbone sees it, so the stored pixels are exactly its input.
    """
    view = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return view.round().clamp(0, 255).to(torch.uint8)


def write_cache(backbone: FrozenCLIP, dataset_root: str | Path, split: str,
                out_path: str | Path, *, size: int, batch_size: int = 8,
                device: str | torch.device = "cpu", progress: bool = True,
                shard_size: int = 64, overwrite: bool = False, step=run_step) -> Path:
    """Cache the backbone's features of every image of ``split`` at ``out_path``; returns it.

    Resumes a store with the same attributes, skipping its finished rows. A store made with
    other settings (size, backbone, split contents...) is refused, or rebuilt if ``overwrite``.
    The backbone is moved to ``device``; it runs ``batch_size`` images at a time, and one shard
    of features (``shard_size`` images) is held in memory before it is written, by a ``step``
    (``common.run_step``) of its own.
    """
    out_path = Path(out_path)
    info = read_classes(dataset_root)
    records = read_manifest(dataset_root, split)
    if not records:
        raise ValueError(f"{dataset_root}: no images in split {split!r}")
    grid = size // backbone.patch_size
    attributes = {"format": FORMAT, **backbone_attributes(backbone), "grid": [grid, grid],
                  "size": size, "split": split,
                  "count": len(records), "classes": info.classes,
                  "image_ids": [r.image_id for r in records]}
    if distributed.is_main():  # the other ranks wait at the barrier for the store it checks
        if out_path.exists():
            existing = open_store(out_path).attrs
            differing = [k for k, v in attributes.items() if existing.get(k) != v]
            if differing and not overwrite:
                raise ValueError(f"{out_path}: existing feature cache was made with other "
                                 f"{', '.join(differing)}; delete it or pass overwrite=True")
            if differing:
                shutil.rmtree(out_path)
        if not out_path.exists():
            labels = np.stack([multi_hot(r.labels, len(info.classes)).numpy() for r in records])
            create_store(out_path, attributes, labels.astype(np.uint8), backbone.depth,
                         backbone.width, shard_size)
    distributed.barrier()

    group = open_store(out_path, mode="r+")
    backbone.to(device)
    shard = group["tokens"].shards[0]  # the store's, whatever ``shard_size`` says on a resume
    mine = [(start, min(start + shard, len(records)))
            for start in distributed.shard(range(0, len(records), shard))]
    # Only this rank's chunks of ``done`` are read: other ranks may be writing theirs.
    todo = [(start, stop) for start, stop in mine if not group["done"][start:stop].all()]
    total = sum(stop - start for start, stop in mine)
    left = sum(stop - start for start, stop in todo)
    share = " (rank 0's share)" if distributed.world_size() > 1 else ""

    def write_shard(start: int, stop: int, bar) -> None:
        views = torch.stack([fixed_view(load_image(r.image), size) for r in records[start:stop]])
        tokens, attn = [], []
        for batch in views.split(batch_size):
            features = backbone(backbone.normalize(batch.to(device)))
            tokens.append(features.tokens.half().cpu())
            attn.append(features.attn.half().cpu())
            bar.update(len(batch))
        group["images"][start:stop] = views.numpy()
        group["tokens"][start:stop] = torch.cat(tokens).numpy()
        group["attn"][start:stop] = torch.cat(attn).numpy()
        group["done"][start:stop] = True  # last: the rows count only once all is written

    with (tqdm(total=total, initial=total - left, desc=f"cache {split}{share}", unit="img",
               disable=not (progress and distributed.is_main())) as bar,
          stop_requests() as requested):
        for start, stop in todo:
            if requested.is_set():
                raise Stopped(f"{out_path}: stopped by a signal; the shards done are kept, run "
                              "again to resume")
            step("write shard", lambda: write_shard(start, stop, bar),
                 f"images {start}-{stop - 1}")
    distributed.barrier()  # so that the store is complete wherever write_cache has returned
    return out_path


