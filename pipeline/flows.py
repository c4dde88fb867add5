"""Each stage as a Prefect flow, so that every run shows in the Prefect UI with its logs.

The flows only wrap the stage functions of the stage modules, adding what Prefect shows:
a run name saying what ran, each step of a stage as a task (train: building the model, each
evaluation and checkpoint, saving the model; cache: each shard; infer: each chunk of images;
evaluate: each scoring and the reports), progress and table artifacts, and log lines with the
figures a stage produced (loss, mIoU, counts, timings, output paths). A stage that has nothing
to do ends in a Completed state whose message says so. ``run_flow`` runs one, as the `weclip`
commands do.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

from .prefect_env import configure

configure()  # before Prefect is imported: it reads its settings then

from prefect import flow, get_run_logger, runtime, tags, task  # noqa: E402
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

from .params import Params, params_fingerprint  # noqa: E402

T = TypeVar("T")


def run_flow(stage_flow, params: Params, extra_tags: list[str] | None = None):
    """Run a stage's flow, tagged `stage:<name>`, with any extra tags and the DVC experiment's
    name; returns its result. A failure propagates as the stage's own exception, for the
    command's one error line."""
    if os.environ.get("WECLIP_DEBUG", "0") in ("", "0"):
        # Prefect logs a failed run's traceback to its API and, through the root logger's
        # handler, to the console, where the one-line error replaces it.
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: not (r.exc_info and r.name.startswith("prefect.")))
    run_tags = [f"stage:{stage_flow.name}", *(extra_tags or [])]
    if os.environ.get("DVC_EXP_NAME"):
        run_tags.append(f"dvc-exp:{os.environ['DVC_EXP_NAME']}")
    with tags(*run_tags):
        try:
            return stage_flow(params)
        except Exception:
            # Prefect logs its shutdown (the temporary server's) at exit, after the error line.
            logging.disable()
            raise


def _run_name() -> str:
    """'<stage> · <dataset> · <DVC experiment, or a digest of all parameters>': the runs of
    one `dvc repro` or `dvc exp run` share the part after the stage."""
    params = runtime.flow_run.parameters["params"]
    groups = tuple(f.name for f in dataclasses.fields(params))
    which = os.environ.get("DVC_EXP_NAME") or params_fingerprint(params, groups)[:8]
    return f"{runtime.flow_run.flow_name} · {params.data.dataset} · {which}"


def _stage(name: str):
    """The flow of the stage ``name`` (the command's name, as in its tag `stage:<name>`)."""
    return flow(name=name, flow_run_name=_run_name, log_prints=True)


def _task(name: str, fn: Callable[[], T], detail: str = "") -> T:
    """Run ``fn`` as a Prefect task named ``name`` (the stages' ``step``, see
    ``stage.run_step``). Never cached nor persisted: a step's result (a model, tensors) lives
    in this process only, and the stage functions do their own resuming."""
    run_name = f"{name} · {detail}" if detail else name
    return task(fn, name=name, task_run_name=run_name, cache_policy=NO_CACHE,
                persist_result=False)()


def _skipped(out: Path) -> Completed | None:
    """When a stage has left only its SKIPPED note in ``out``: a Completed state with the
    note as its message (the UI shows it beside the state), else None."""
    note = out / "SKIPPED"
    if not note.exists():
        return None
    message = f"nothing done: {note.read_text().strip()}"
    get_run_logger().info(message)
    return Completed(message=message, data=str(out))  # data: what the command prints


@_stage("prepare")
def prepare_flow(params: Params) -> str:
    from .prepare import prepare

    out = prepare(params)
    get_run_logger().info("prepared %s at %s", params.data.dataset, out)
    return str(out)


@_stage("cache")
def cache_flow(params: Params):
    from .cache import cache

    out = cache(params, step=_task)
    if skipped := _skipped(out):
        return skipped
    get_run_logger().info("features of split %s cached at %s", params.train.split, out)
    return str(out)


def _read_table(path: Path) -> list[dict]:
    """The rows of a CSV of numbers, an empty cell as None."""
    def number(cell: str) -> int | float | None:
        return int(cell) if cell.isdigit() else float(cell) if cell else None

    with open(path, newline="") as f:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]


class _TrainReport:
    """The train loop's callbacks: a log line and the progress artifact at every logged
    iteration, a log line and the evaluation table at every evaluation."""

    def __init__(self, params: Params, stage: str, out: Path):
        self.iters, self.stage, self.out = params.train.iters, stage, out
        self.logger = get_run_logger()
        self.progress = None  # created at the first logged iteration: a skipped stage has none
        self.last = None  # (time, iteration) of the previous logged iteration

    def on_log(self, iteration: int, losses: dict) -> None:
        line = (f"iteration {iteration}/{self.iters}: loss {losses['loss']:.4f} "
                f"(seg {losses['seg_loss']:.4f}, aff {losses['aff_loss']:.4f}), "
                f"lr {losses['lr']:.3g}")
        now = time.monotonic()
        if self.last:  # the speed is measured between logged iterations, so not at the first
            speed = (iteration - self.last[1]) / (now - self.last[0])
            eta = timedelta(seconds=round((self.iters - iteration) / speed))
            line += f", {speed:.2f} it/s, ETA {eta}"
        self.last = (now, iteration)
        self.logger.info(line)
        percent = 100 * iteration / self.iters
        if self.progress is None:
            self.progress = create_progress_artifact(
                progress=percent, key=f"{self.stage}-progress", description="iterations done, percent")
        else:
            update_progress_artifact(artifact_id=self.progress, progress=percent)

    def on_eval(self, iteration: int, mious: dict) -> None:
        line = f"iteration {iteration}: val mIoU {mious['val_miou']}"
        if "train_pseudo_miou" in mious:  # a model trained on masks makes no pseudo labels
            line += f", train pseudo-label mIoU {mious['train_pseudo_miou']}"
        self.logger.info(line)
        # A new version of the same key each time, from eval.csv: it holds a resumed run's
        # earlier rows too, and the table is there while the run goes on or if it fails.
        create_table_artifact(key=f"{self.stage}-evaluation", table=_read_table(self.out / "eval.csv"),
                              description="pseudo-label mIoU (train) and segmentation mIoU (val)")


@_stage("train")
def train_flow(params: Params) -> str:
    from .train import train

    report = _TrainReport(params, "train", Path(params.train.out))
    return str(train(params, on_log=report.on_log, on_eval=report.on_eval, step=_task))


@_stage("upper-bound")
def upper_bound_flow(params: Params):
    from .train import train_upper_bound

    out = Path(params.upper_bound.out)
    report = _TrainReport(params, "upper-bound", out)
    model = train_upper_bound(params, on_log=report.on_log, on_eval=report.on_eval,
                              step=_task)
    return _skipped(out) if model is None else str(model)


@_stage("infer")
def infer_flow(params: Params) -> str:
    from .infer import infer

    start = time.monotonic()
    out = infer(params, step=_task)
    done = len(list((out / "crf").glob("*.png")))
    get_run_logger().info("%d images of split %s segmented in %s (single/, msf/, crf/), %.1f s",
                          done, params.infer.split, out, time.monotonic() - start)
    return str(out)


@_stage("evaluate")
def evaluate_flow(params: Params) -> dict:
    from .evaluate import evaluate

    start = time.monotonic()
    metrics, table = evaluate(params, step=_task)
    val = metrics["val"]
    get_run_logger().info(
        "val mIoU %s (without CRF %s, single scale %s), train pseudo-label mIoU %s; reports in "
        "%s (metrics.json, iou.md, plots), %.1f s", val["miou"], val["miou_no_crf"],
        val["miou_single_scale"], metrics["train"]["pseudo_miou"], params.evaluate.out,
        time.monotonic() - start)
    rows = table.reset_index().astype(object).where(table.reset_index().notna(), None)
    create_table_artifact(key="iou", table=rows.to_dict("records"),
                          description="IoU per class of every step of the method (percent)")
    return metrics
