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
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weclip.backbone import FrozenCLIP
from weclip.contract import multi_hot, read_classes, read_manifest
from weclip.files import NoSpaceError, no_space
from weclip.images import load_image

from . import distributed
from .features import FORMAT, backbone_attributes, create_store, open_store
from .params import Params
from .stage import Stopped, discard_stale, run_step, stage


def cache(params: Params, step=run_step) -> Path:
    """The stage: write ``cache.path`` when ``train.features`` is 'cache'; otherwise leave only
    a note there (DVC always has the stage). Returns the store's path. ``step`` runs the
    writing of each shard (``stage.run_step``)."""
    path = Path(params.cache.path)
    skipped = path / "SKIPPED"
    if params.train.features != "cache":
        if distributed.is_main():
            path.mkdir(parents=True, exist_ok=True)
            skipped.write_text("train.features is 'online': no feature cache is needed\n")
        return path
    with stage(path, params.cache.device) as run:
        if skipped.exists() and distributed.is_main():
            shutil.rmtree(path)
        backbone = FrozenCLIP.from_config(params.model)
        return write_cache(backbone, params.dataset_dir, params.train.split, path,
                           size=params.train.crop_size, batch_size=params.cache.batch_size,
                           shard_size=params.cache.shard_size, device=run.device, step=step,
                           stop=run.stop)


def fixed_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """A [3, H, W] 0-255 image resized bilinearly to uint8 [3, size, size].

    Rounded to uint8 before the backbone sees it, so the stored pixels are exactly its input.
    """
    view = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return view.round().clamp(0, 255).to(torch.uint8)


def write_cache(backbone: FrozenCLIP, dataset_root: str | Path, split: str,
                out_path: str | Path, *, size: int, batch_size: int = 8,
                device: str | torch.device = "cpu", progress: bool = True,
                shard_size: int = 64, step=run_step, stop: threading.Event | None = None) -> Path:
    """Cache the backbone's features of every image of ``split`` at ``out_path``; returns it.

    Resumes a store with the same attributes, skipping its finished rows; a store made with
    other settings (size, backbone, split contents...) is discarded and made afresh. The
    backbone is moved to ``device``; it runs ``batch_size`` images at a time, and one shard of
    features (``shard_size`` images) is held in memory before it is written, by a ``step``
    (``stage.run_step``) of its own. When the Event ``stop`` is set, it stops after the current
    shard, raising ``Stopped``.
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
            if any(existing.get(k) != v for k, v in attributes.items()):
                discard_stale(out_path, "feature cache")
        if not out_path.exists():
            labels = np.array([multi_hot(r.labels, len(info.classes)) for r in records])
            create_store(out_path, attributes, labels.astype(np.uint8), backbone.depth,
                         backbone.width, shard_size)
    distributed.barrier()

    group = open_store(out_path, mode="r+")
    backbone.to(device)
    shard = group["tokens"].shards[0]  # the store's, whatever ``shard_size`` says on a resume
    mine = [(start, min(start + shard, len(records)))
            for start in distributed.shard(range(0, len(records), shard))]
    # Only this rank's chunks of ``done`` are read: other ranks may be writing theirs.
    todo = [(start, end) for start, end in mine if not group["done"][start:end].all()]
    total = sum(end - start for start, end in mine)
    left = sum(end - start for start, end in todo)
    share = " (rank 0's share)" if distributed.world_size() > 1 else ""

    def write_shard(start: int, end: int, bar) -> None:
        views = torch.stack([fixed_view(load_image(r.image), size) for r in records[start:end]])
        tokens, attn = [], []
        for batch in views.split(batch_size):
            features = backbone(backbone.normalize(batch.to(device)))
            tokens.append(features.tokens.half().cpu())
            attn.append(features.attn.half().cpu())
            bar.update(len(batch))
        arrays = {"images": views.numpy(), "tokens": torch.cat(tokens).numpy(),
                  "attn": torch.cat(attn).numpy()}
        try:
            for name, array in arrays.items():
                group[name][start:end] = array
        except OSError as e:  # a shard file is written whole or not at all
            if not no_space(e):
                raise
            needed = sum(a.nbytes for a in arrays.values())  # before compression
            raise NoSpaceError(out_path, needed, "up to ") from None
        group["done"][start:end] = True  # last: the rows count only once all is written

    with tqdm(total=total, initial=total - left, desc=f"cache {split}{share}", unit="img",
              disable=not (progress and distributed.is_main())) as bar:
        for start, end in todo:
            if stop is not None and stop.is_set():
                raise Stopped(f"{out_path}: stopped by a signal; the shards done are kept, run "
                              "again to resume")
            step("write shard", lambda: write_shard(start, end, bar), f"images {start}-{end - 1}")
    distributed.barrier()  # so that the store is complete wherever write_cache has returned
    return out_path


