"""Each stage as a Prefect flow, so that every run shows in the Prefect UI with its logs.

The flows only wrap the stage functions of the stage modules, adding what Prefect shows
(progress and table artifacts, log lines). Import this only after
``pipeline.prefect_env.configure()``: Prefect reads its settings at import.
"""
from __future__ import annotations

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
    from .cache import cache

    return str(cache(params))


def _train_with_artifacts(run, params: Params, stage: str) -> Path | None:
    progress = create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                        description="iterations done, percent")
    rows = []

    def on_log(iteration, row):
        update_progress_artifact(artifact_id=progress, progress=100 * iteration / params.train.iters)

    def on_eval(iteration, row):
        rows.append(row)
        get_run_logger().info("iteration %d: %s", iteration, row)

    model = run(params, on_log=on_log, on_eval=on_eval)
    if rows:
        create_table_artifact(key=f"{stage}-evaluation", table=rows,
                              description="pseudo-label mIoU (train) and segmentation mIoU (val)")
    return model


@flow(name="train", log_prints=True)
def train_flow(params: Params) -> str:
    from .train import train

    return str(_train_with_artifacts(train, params, "train"))


@flow(name="upper-bound", log_prints=True)
def upper_bound_flow(params: Params) -> str:
    from .train import train_upper_bound

    return str(_train_with_artifacts(train_upper_bound, params, "upper-bound"))


@flow(name="infer", log_prints=True)
def infer_flow(params: Params) -> str:
    from .infer import infer

    return str(infer(params))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: Params) -> dict:
    from .evaluate import evaluate

    metrics, table = evaluate(params)
    rows = table.reset_index().astype(object).where(table.reset_index().notna(), None)
    create_table_artifact(key="iou", table=rows.to_dict("records"),
                          description="IoU per class of every step of the method (percent)")
    return metrics
