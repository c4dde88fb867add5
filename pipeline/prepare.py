"""The prepare stage: the chosen dataset into the data contract under ``data.out``/``data.dataset``."""
from __future__ import annotations

from pathlib import Path

from .params import Params

DATASETS = ("world", "voc", "coco", "folder")


def prepare(params: Params) -> Path:
    """Prepare ``params.data.dataset`` and return its folder (classes.json + manifest.csv)."""
    d, out = params.data, params.dataset_dir
    common = dict(skip_bad=d.skip_bad, workers=d.workers, max_pixels=d.max_pixels)
    if d.dataset == "world":
        from .datasets.world import generate_world
        return generate_world(out, seed=d.seed, **vars(d.world))
    if d.dataset == "voc":
        from .datasets.voc import prepare_voc
        return prepare_voc(out, **common, **d.voc)
    if d.dataset == "coco":
        from .datasets.coco import prepare_coco
        return prepare_coco(out, **common, **d.coco)
    if d.dataset == "folder":
        from .datasets.folder import prepare_folder
        return prepare_folder(out, **common, **d.folder)
    raise ValueError(f"data.dataset: {d.dataset!r} is not one of {', '.join(DATASETS)}")
