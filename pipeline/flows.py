"""Each stage as a Prefect flow, so that every run shows in the Prefect UI with its logs.

Import this only after ``pipeline.prefect_env.configure()``: Prefect reads its settings at import.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from .params import Params


@flow(name="prepare", log_prints=True)
def prepare_flow(params: Params) -> str:
    from .prepare import prepare

    out = prepare(params)
    get_run_logger().info("prepared %s at %s", params.data.dataset, out)
    return str(out)


@flow(name="cache", log_prints=True)
def cache_flow(params: Params) -> str:
    from weclip import FrozenCLIP

    from .cache import write_cache
    from .train import resolve_device

    path = Path(params.cache.path)
    skipped = path / "SKIPPED"
    if params.train.features != "cache":
        # dvc.yaml always has this stage; with online features it only leaves this note.
        path.mkdir(parents=True, exist_ok=True)
        skipped.write_text("train.features is 'online': no feature cache is needed\n")
        return str(path)
    if skipped.exists():
        shutil.rmtree(path)
    backbone = FrozenCLIP.from_config(params.clip.arch, params.clip.weights)
    out = write_cache(backbone, params.dataset_dir, params.train.split, params.cache.path,
                      size=params.train.crop_size, normalization=params.clip.normalization,
                      batch_size=params.cache.batch_size,
                      device=resolve_device(params.cache.device))
    return str(out)


@flow(name="train", log_prints=True)
def train_flow(params: Params) -> str:
    from .train import train

    progress = create_progress_artifact(progress=0.0, key="train-progress",
                                        description="iterations done, percent")
    rows = []

    def on_log(iteration, row):
        update_progress_artifact(artifact_id=progress, progress=100 * iteration / params.train.iters)

    def on_eval(iteration, row):
        rows.append(row)
        get_run_logger().info("iteration %d: %s", iteration, row)

    model = train(params, on_log=on_log, on_eval=on_eval)
    create_table_artifact(key="train-evaluation", table=rows,
                          description="pseudo-label mIoU (train) and segmentation mIoU (val)")
    return str(model)


@flow(name="upper-bound", log_prints=True)
def upper_bound_flow(params: Params) -> str:
    """The decoder trained on ground-truth masks, when ``upper_bound.enabled``."""
    from dataclasses import replace

    from .train import train

    out = Path(params.upper_bound.out)
    skipped = out / "SKIPPED"
    if not params.upper_bound.enabled:
        # dvc.yaml always has this stage; disabled, it only leaves this note.
        out.mkdir(parents=True, exist_ok=True)
        skipped.write_text("upper_bound.enabled is false: no fully supervised model\n")
        return str(out)
    skipped.unlink(missing_ok=True)
    supervised = replace(params, train=replace(params.train, supervision="masks",
                                               features="online", out=str(out)))
    return str(train(supervised))


@flow(name="infer", log_prints=True)
def infer_flow(params: Params) -> str:
    from .infer import infer

    return str(infer(params, Path(params.train.out) / "model.pt"))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: Params) -> dict:
    from .evaluate import evaluate

    metrics, table = evaluate(params, Path(params.train.out) / "model.pt")
    rows = table.reset_index().astype(object).where(table.reset_index().notna(), None)
    create_table_artifact(key="iou", table=rows.to_dict("records"),
                          description="IoU per class of every step of the method (percent)")
    return metrics
