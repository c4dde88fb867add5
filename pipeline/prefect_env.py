"""Prefect settings for runs started from this project, and the Prefect server the runs report to.

A stage reports to ``PREFECT_API_URL`` when it is set; otherwise it starts a local server of its
own on the SQLite database under ``PREFECT_HOME`` (``.prefect/`` in the working directory by
default), which ends with it. That costs a server start per command, so `make repro` runs
``python -m pipeline.prefect_env serve -- dvc repro``, which starts one server on the same
database for all the stages and stops it at the end, and `weclip ui` (`make ui`) serves the
UI on that database. Every server started here dies with the process that started it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .orphans import die_with_parent

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
    # A server that does not answer costs a report at most 10 s and 2 retries, in the
    # monitor's thread (pipeline/monitor.py), never in a stage's.
    "PREFECT_API_REQUEST_TIMEOUT": "10",
    "PREFECT_CLIENT_MAX_RETRIES": "2",
}
# How long a server started here may take to answer (a busy 2-core machine is slow).
STARTUP_SECONDS = 180


def configure() -> None:
    """Set the defaults above (and PREFECT_HOME) unless the environment already has them."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():
        # Progress bars written to a log (dvc repro, CI) update every 10 s, not every step.
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))


def _api(port: int | str) -> str:
    return f"http://127.0.0.1:{port}/api"


def _server_command(port: int | str) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--port", str(port)]


def _ui_port() -> str:
    """The port of the server a user browses: PREFECT_SERVER_API_PORT, 4200 by default (a
    server a stage starts for itself takes a free one)."""
    return os.environ.get("PREFECT_SERVER_API_PORT", "4200")


def _server_log() -> Path:
    return Path(os.environ["PREFECT_HOME"]) / "server.log"


def answers(api: str) -> bool:
    """Whether a Prefect API answers at ``api`` (within 2 s)."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(port: int | None = None) -> tuple[str, subprocess.Popen]:
    """A Prefect server on PREFECT_HOME at ``port`` (a free one if None), its output in
    PREFECT_HOME/server.log, ending with this process: (its API address, the process). It
    answers some seconds later (``wait_for``)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    log = _server_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen(_server_command(port), stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=die_with_parent)
    return _api(port), server


def wait_for(api: str, server: subprocess.Popen) -> bool:
    """Wait until the server started at ``api`` answers; False if it ended or took too long."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not answers(api):
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def stop(server: subprocess.Popen | None) -> None:
    if server is not None:
        server.terminate()
        server.wait()


def serve(command: list[str]) -> int:
    """Run ``command`` with every Prefect run in it reporting to one server; its exit code.

    The server is PREFECT_API_URL's when set, else a local one at PREFECT_SERVER_API_PORT
    (4200): the one already answering (`make ui` in another terminal), or one started for the
    command and stopped after it, whatever the command's outcome.
    """
    configure()
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.run(command).returncode
    port = _ui_port()
    api, server = _api(port), None
    if not answers(api):
        api, server = start_server(int(port))
        if not wait_for(api, server):
            stop(server)
            sys.exit(f"error: the Prefect server did not start; see {_server_log()}")
    print(f"Prefect UI at {api.removesuffix('/api')} (runs on {os.environ['PREFECT_HOME']})",
          flush=True)
    try:
        return subprocess.run(command, env={**os.environ, "PREFECT_API_URL": api}).returncode
    finally:
        stop(server)


def ui() -> int:
    """Serve the UI on PREFECT_HOME in the foreground, unless a server already answers."""
    configure()
    port = _ui_port()
    api = _api(port)
    if os.environ.get("PREFECT_API_URL"):
        print(f"PREFECT_API_URL is set: the runs are on {os.environ['PREFECT_API_URL']}")
    elif answers(api):
        print(f"a Prefect server is already running: open {api.removesuffix('/api')}")
    else:  # it prints the address; Ctrl-C stops it
        return subprocess.run(_server_command(port)).returncode
    return 0


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["serve", "--", *command] if command:
            sys.exit(serve(command))
        case _:
            sys.exit("usage: python -m pipeline.prefect_env serve -- COMMAND...")
