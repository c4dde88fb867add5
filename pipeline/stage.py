"""What every stage that works on a device shares (train, cache, infer): its device and process
group, one writer per output folder, stopping cleanly on a signal, its steps, and the one resume
policy for outputs made with other settings.

    with stage(out, params.train.device) as run:   # run.device, run.stop (an Event)
        ...                                          # rank 0 holds out's lock

Resume policy (docs/running.md): a resumable output records the settings it was made with (a
fingerprint); a run with other settings discards it, says so in one warning line (the console
and the Prefect run), and starts afresh. An output that cannot be read is an error that names
it; nothing is deleted then.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from . import distributed

T = TypeVar("T")
log = logging.getLogger("pipeline")


def run_step(name: str, fn: Callable[[], T], detail: str = "") -> T:
    """Run ``fn``, one step of a stage (an evaluation, a checkpoint, a chunk of images...), and
    return its result: how a stage runs its steps by default. The flows (pipeline/flows.py)
    pass instead one that runs each step as a Prefect task named ``name`` (its run named by
    ``detail`` too), so that a run's timeline shows them."""
    return fn()


class Stopped(RuntimeError):
    """A stage stopped by SIGTERM or SIGINT after saving its progress; rerunning it resumes."""


@dataclass
class Run:
    """A stage's run: its device, and the Event that SIGTERM or SIGINT set."""

    device: torch.device
    stop: threading.Event


@contextmanager
def stage(out: Path, device: str) -> Iterator[Run]:
    """Open a stage writing ``out`` on ``device`` (a params device name): join the process
    group (under torchrun), hold ``out``'s lock on rank 0, and turn SIGTERM and SIGINT into
    ``Run.stop`` for the block."""
    run_device = distributed.local_device(device)
    distributed.init(run_device)
    with ExitStack() as stack:
        if distributed.is_main():
            stack.enter_context(exclusive(out))
        yield Run(run_device, stack.enter_context(stop_requests()))


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
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


def discard_stale(path: Path, what: str) -> None:
    """The resume policy's one action: ``path`` (a file or folder) was made with other
    settings; remove it and say so."""
    log.warning("%s: %s made with other settings; starting afresh", path, what)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
