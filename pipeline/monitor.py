"""Monitoring: a stage's run reported to Prefect, never in the stage's way.

The stage runs in this process as plain Python. A ``Monitor`` reports it to the Prefect API from
a background thread: the flow run (named, tagged, with its parameters and final state), each
step as a task run, the stage's log lines, and table and progress artifacts. The stage only
queues reports, so whatever the API does (unreachable from the start, gone in the middle, slow,
back again), its work goes on and ends as it would have. While the API does not answer, the
console says so once; logs and artifacts are dropped, the runs' and steps' states are kept and
sent when it answers again, and at the end the monitor waits at most ``FLUSH_SECONDS`` for what
is left. Each request is bounded by Prefect's own client settings (``PREFECT_API_REQUEST_TIMEOUT``,
``PREFECT_CLIENT_MAX_RETRIES``; pipeline/prefect_env.py sets their defaults).
"""
from __future__ import annotations

import json
import logging
import math
import queue
import subprocess
import threading
import time
from datetime import datetime, timezone
from typing import Callable, TypeVar
from uuid import UUID, uuid4

# Everything of Prefect is imported here, in the stage's thread: the reporter's thread
# importing modules while the stage imports others can deadlock on Python's import locks.
from prefect import flow, task
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate, LogCreate
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY
from prefect.states import Completed, Failed, Running

from .prefect_env import answers, wait_for

T = TypeVar("T")
log = logging.getLogger("pipeline")

FLUSH_SECONDS = 20.0  # the longest a stage waits at its end for its last reports
PROBE_SECONDS = 5.0  # how often an unreachable API is asked again


class Monitor:
    """Report a run of stage ``stage`` named ``run_name`` to the Prefect API at ``api``
    (served by ``server``, a process started for it, or by another process when None).

    ``with Monitor(...) as monitor:`` around the stage; ``monitor.step`` runs its steps,
    ``monitor.table`` and ``monitor.progress`` publish artifacts, and every record of the
    ``pipeline`` logger within the block is sent as a log line of the run.
    """

    def __init__(self, api: str, stage: str, run_name: str, tags: list[str],
                 parameters: dict, server: subprocess.Popen | None = None):
        self.api, self.stage, self.run_name, self.server = api, stage, run_name, server
        self.tags, self.parameters = tags, parameters
        self.message = None  # the final state's message, when the stage sets one
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="prefect-monitor", daemon=True)
        self._handler = _Forward(self)
        self._flow_run: UUID | None = None
        self._steps = 0
        self._tasks = {}  # step name -> prefect Task, for its task runs
        self._artifacts = {}  # progress key -> artifact id
        self._pending = []  # state reports kept while the API does not answer
        self._online = True
        self._next_probe = 0.0

    # ------------------------------------------------------------------ the stage's side

    def __enter__(self) -> "Monitor":
        self._thread.start()
        self._queue.put(("flow run",))
        log.addHandler(self._handler)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        log.removeHandler(self._handler)
        state = (Completed(message=self.message) if error is None
                 else Failed(message=f"{kind.__name__}: {error}"))
        self._queue.put(("flow state", state))
        self._queue.put(None)
        self._thread.join(FLUSH_SECONDS)
        if self._online and (self._thread.is_alive() or self._pending):  # else said already
            log.warning("monitoring: the last reports of this run did not reach the Prefect "
                        "API at %s in time; the run's outputs are complete", self.api)

    def step(self, name: str, fn: Callable[[], T], detail: str = "") -> T:
        """Run ``fn``, reported as a task run named ``name · detail`` (the stages' ``step``,
        see ``stage.run_step``)."""
        task_run, self._steps = uuid4(), self._steps + 1
        self._queue.put(("task run", task_run, name, f"{name} · {detail}" if detail else name,
                         self._steps, Running()))
        try:
            result = fn()
        except BaseException as e:
            self._queue.put(("task state", task_run, Failed(message=f"{type(e).__name__}: {e}")))
            raise
        self._queue.put(("task state", task_run, Completed()))
        return result

    def table(self, key: str, rows: list[dict], description: str) -> None:
        """A table artifact (a new version of ``key``)."""
        self._queue.put(("table", key, rows, description))

    def progress(self, key: str, percent: float, description: str) -> None:
        """The progress artifact ``key``, created at the first call, updated after."""
        self._queue.put(("progress", key, percent, description))

    # ------------------------------------------------------------------ the reporter's side

    def _work(self) -> None:
        # A server started for this run takes seconds to answer; meanwhile reports queue up.
        if self.server is not None and not wait_for(self.api, self.server):
            self._went_away(TimeoutError("it did not start"))
        with SyncPrefectClient(self.api, api_key=PREFECT_API_KEY.value(),
                               auth_string=PREFECT_API_AUTH_STRING.value()) as client:
            while (item := self._queue.get()) is not None:
                self._deliver(client, item)
            if self._pending and self._reachable():
                self._deliver_pending(client)

    def _deliver(self, client, item: tuple) -> None:
        kind = item[0]
        keep = kind in ("flow run", "flow state", "task run", "task state")
        if not self._reachable():
            if keep:
                self._pending.append(item)
            return
        if self._pending:
            self._deliver_pending(client)
        try:
            self._send(client, item)
        except Exception as e:  # an unreachable, slow or failing API: never the stage's end
            self._went_away(e)
            if keep:
                self._pending.append(item)

    def _deliver_pending(self, client) -> None:
        pending, self._pending = self._pending, []
        for i, item in enumerate(pending):
            try:
                self._send(client, item)
            except Exception as e:
                self._went_away(e)
                self._pending = pending[i:] + self._pending
                return

    def _reachable(self) -> bool:
        """False while the API is known not to answer, until a probe finds it back."""
        if self._online or time.monotonic() < self._next_probe:
            return self._online
        self._online = answers(self.api)
        if self._online:
            log.warning("monitoring: the Prefect API at %s answers again; reporting resumed",
                        self.api)
        else:
            self._next_probe = time.monotonic() + PROBE_SECONDS
        return self._online

    def _went_away(self, error: Exception) -> None:
        if self._online:
            log.warning("monitoring: the Prefect API at %s does not answer (%s: %s); the "
                        "stage goes on, reporting resumes when it answers", self.api,
                        type(error).__name__, error)
        self._online = False
        self._next_probe = time.monotonic() + PROBE_SECONDS

    def _send(self, client, item: tuple) -> None:
        kind, *rest = item
        if kind == "flow run":
            self._flow_run = client.create_flow_run(
                flow(_nothing, name=self.stage), name=self.run_name, tags=self.tags,
                parameters=self.parameters, state=Running()).id
        elif self._flow_run is None:
            raise ConnectionError("the flow run is not created yet")
        elif kind == "flow state":
            client.set_flow_run_state(self._flow_run, rest[0], force=True)
        elif kind == "task run":
            task_run, name, run_name, order, state = rest
            if name not in self._tasks:
                self._tasks[name] = task(_nothing, name=name)
            client.create_task_run(self._tasks[name], self._flow_run, dynamic_key=str(order),
                                   id=task_run, name=run_name, state=state)
        elif kind == "task state":
            client.set_task_run_state(rest[0], rest[1], force=True)
        elif kind == "log":
            level, message, created, task_run = rest
            client.create_logs([LogCreate(
                name="pipeline", level=level, message=message, flow_run_id=self._flow_run,
                task_run_id=task_run, timestamp=created)])
        elif kind == "table":
            key, rows, description = rest
            client.create_artifact(ArtifactCreate(
                key=key, type="table", data=json.dumps(_plain(rows)), description=description,
                flow_run_id=self._flow_run))
        elif kind == "progress":
            key, percent, description = rest
            if key in self._artifacts:
                client.update_artifact(self._artifacts[key], ArtifactUpdate(data=float(percent)))
            else:
                self._artifacts[key] = client.create_artifact(ArtifactCreate(
                    key=key, type="progress", data=float(percent), description=description,
                    flow_run_id=self._flow_run)).id


class _Forward(logging.Handler):
    """Send the ``pipeline`` logger's records as log lines of the monitored run."""

    def __init__(self, monitor: Monitor):
        super().__init__(logging.INFO)
        self.monitor = monitor

    def emit(self, record: logging.LogRecord) -> None:
        created = datetime.fromtimestamp(record.created, timezone.utc)
        self.monitor._queue.put(("log", record.levelno, record.getMessage(), created, None))


def _nothing():
    """The function behind the flow and task objects that name the reported runs."""


def _plain(rows: list[dict]) -> list[dict]:
    """Rows with NaN as None: JSON has no NaN."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in rows]
