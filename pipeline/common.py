"""What several stages share: their steps, scoring a model on a split, stopping cleanly on a
signal, and one writer per output folder."""
from __future__ import annotations

import fcntl
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import torch

from weclip import WeCLIP, predict
from weclip.dataset import EvalDataset
from weclip.metrics import confusion_matrix

T = TypeVar("T")


def run_step(name: str, fn: Callable[[], T], detail: str = "") -> T:
    """Run ``fn``, one step of a stage (an evaluation, a checkpoint, a chunk of images...), and
    return its result: how a stage runs its steps by default. The flows (pipeline/flows.py)
    pass instead one that runs each step as a Prefect task named ``name`` (its run named by
    ``detail`` too), so that a run's timeline shows them."""
    return fn()


@torch.no_grad()
def score(model: WeCLIP, dataset: EvalDataset, device, limit: int | None = None,
          pseudo: bool = True, prediction: bool = True) -> dict[str, torch.Tensor]:
    """Confusion matrices [C+1, C+1] of the pseudo labels (RFM + PAR, from the image labels) and
    of the single-scale prediction over the first ``limit`` images of ``dataset`` with masks."""
    model.eval()
    c = model.num_classes
    out = {k: torch.zeros(c, c, dtype=torch.long) for k, on in
           (("pseudo", pseudo), ("prediction", prediction)) if on}
    for i in dataset.with_masks(limit):
        item = dataset[i]
        image = item.image[None].to(device)
        if pseudo:
            labels = model(image, item.labels[None]).pseudo[0].cpu()
            out["pseudo"] += confusion_matrix(labels, item.mask, c)
        if prediction:
            probs = predict(model, image, scales=(1.0,), flip=False, long_side=None)
            out["prediction"] += confusion_matrix(probs.argmax(1)[0].cpu(), item.mask, c)
    return out


class Stopped(RuntimeError):
    """A stage stopped by SIGTERM or SIGINT after saving its progress; rerunning it resumes."""


@contextmanager
def stop_requests():
    """Within the block SIGTERM and SIGINT (a job scheduler, `kill`, Ctrl-C, a cancelled
    `dvc repro`) set the yielded Event instead of ending the process, so that the stage stops
    at its next safe point (after an iteration, an image or a shard) with its progress saved.
    Outside the main thread, where Python cannot handle signals, the Event is never set."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda *_: requested.set()) for s in signals}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def exclusive(folder: Path):
    """Hold ``folder``'s lock (the file <folder>.lock beside it, outside what DVC hashes) for
    the block, so that two runs never write the same outputs; a folder locked by another process
    is refused. The operating system releases the lock when the process ends, however it ends."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ValueError(f"{folder}: another weclip run ({lock.read().strip() or 'a process'}) "
                             "is writing here; wait for it or stop it") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        yield
