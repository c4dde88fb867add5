"""Each stage as a Prefect flow run, so that every run shows in the Prefect UI with its logs.

The flows wrap the stage functions of the stage modules, adding what Prefect shows: a run name
saying what ran, each step of a stage as a task (train: building the model, each evaluation and
checkpoint, saving the model; cache: each shard; infer: each chunk of images; evaluate: each
scoring and the reports), progress and table artifacts, and log lines with the figures a stage
produced (loss, mIoU, counts, timings, output paths). A stage that has nothing to do ends in a
Completed state whose message says so. The stage itself runs here, in this process; a
``Monitor`` reports it (pipeline/monitor.py), so that the Prefect server is never on the
stage's critical path.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from . import prefect_env

prefect_env.configure()  # before Prefect is imported: it reads some settings then

from .monitor import Monitor  # noqa: E402
from .params import Params, params_fingerprint  # noqa: E402

log = logging.getLogger("pipeline.flows")


def _run_name(stage: str, params: Params) -> str:
    """'<stage> · <dataset> · <DVC experiment, or a digest of all parameters>': the runs of
    one `dvc repro` or `dvc exp run` share the part after the stage."""
    groups = tuple(f.name for f in dataclasses.fields(params))
    which = os.environ.get("DVC_EXP_NAME") or params_fingerprint(params, groups)[:8]
    return f"{stage} · {params.data.dataset} · {which}"


@contextmanager
def monitored(stage: str, params: Params, extra_tags: list[str] | None = None):
    """The run of ``stage`` on ``params``, reported to PREFECT_API_URL or to a local server
    started for it, tagged `stage:<name>`, with any extra tags and the DVC experiment's name."""
    api, server = os.environ.get("PREFECT_API_URL"), None
    if not api:
        api, server = prefect_env.start_server()
    tags = [f"stage:{stage}", *(extra_tags or [])]
    if os.environ.get("DVC_EXP_NAME"):
        tags.append(f"dvc-exp:{os.environ['DVC_EXP_NAME']}")
    try:
        with Monitor(api, stage, _run_name(stage, params), tags,
                     {"params": dataclasses.asdict(params)}, server) as monitor:
            yield monitor
    finally:
        prefect_env.stop(server)


def _skipped(out: Path, monitor: Monitor) -> str | None:
    """When a stage has left only its SKIPPED note in ``out``: the run's message says so."""
    note = out / "SKIPPED"
    if not note.exists():
        return None
    monitor.message = f"nothing done: {note.read_text().strip()}"
    log.info(monitor.message)
    return str(out)


def prepare_flow(params: Params, tags: list[str] | None = None) -> str:
    from .prepare import prepare

    with monitored("prepare", params, tags):
        out = prepare(params)
        log.info("prepared %s at %s", params.data.dataset, out)
        return str(out)


def cache_flow(params: Params, tags: list[str] | None = None) -> str:
    from .cache import cache

    with monitored("cache", params, tags) as monitor:
        out = cache(params, step=monitor.step)
        if skipped := _skipped(out, monitor):
            return skipped
        log.info("features of split %s cached at %s", params.train.split, out)
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

    def __init__(self, params: Params, stage: str, out: Path, monitor: Monitor):
        self.iters, self.stage, self.out, self.monitor = params.train.iters, stage, out, monitor
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
        log.info(line)
        self.monitor.progress(f"{self.stage}-progress", 100 * iteration / self.iters,
                              "iterations done, percent")

    def on_eval(self, iteration: int, mious: dict) -> None:
        line = f"iteration {iteration}: val mIoU {mious['val_miou']}"
        if "train_pseudo_miou" in mious:  # a model trained on masks makes no pseudo labels
            line += f", train pseudo-label mIoU {mious['train_pseudo_miou']}"
        log.info(line)
        # A new version of the same key each time, from eval.csv: it holds a resumed run's
        # earlier rows too, and the table is there while the run goes on or if it fails.
        self.monitor.table(f"{self.stage}-evaluation", _read_table(self.out / "eval.csv"),
                           "pseudo-label mIoU (train) and segmentation mIoU (val)")


def train_flow(params: Params, tags: list[str] | None = None) -> str:
    from .train import train

    with monitored("train", params, tags) as monitor:
        report = _TrainReport(params, "train", Path(params.train.out), monitor)
        return str(train(params, on_log=report.on_log, on_eval=report.on_eval,
                         step=monitor.step))


def upper_bound_flow(params: Params, tags: list[str] | None = None) -> str:
    from .train import train_upper_bound

    out = Path(params.upper_bound.out)
    with monitored("upper-bound", params, tags) as monitor:
        report = _TrainReport(params, "upper-bound", out, monitor)
        model = train_upper_bound(params, on_log=report.on_log, on_eval=report.on_eval,
                                  step=monitor.step)
        return _skipped(out, monitor) if model is None else str(model)


def infer_flow(params: Params, tags: list[str] | None = None) -> str:
    from .infer import infer

    with monitored("infer", params, tags) as monitor:
        start = time.monotonic()
        out = infer(params, step=monitor.step)
        done = len(list((out / "crf").glob("*.png")))
        log.info("%d images of split %s segmented in %s (single/, msf/, crf/), %.1f s",
                 done, params.infer.split, out, time.monotonic() - start)
        return str(out)


def evaluate_flow(params: Params, tags: list[str] | None = None) -> dict:
    from .evaluate import evaluate

    with monitored("evaluate", params, tags) as monitor:
        start = time.monotonic()
        metrics, table = evaluate(params, step=monitor.step)
        val = metrics["val"]
        log.info("val mIoU %s (without CRF %s, single scale %s), train pseudo-label mIoU %s; "
                 "reports in %s (metrics.json, iou.md, plots), %.1f s", val["miou"],
                 val["miou_no_crf"], val["miou_single_scale"], metrics["train"]["pseudo_miou"],
                 params.evaluate.out, time.monotonic() - start)
        monitor.table("iou", table.reset_index().to_dict("records"),
                      "IoU per class of every step of the method (percent)")
        return metrics
