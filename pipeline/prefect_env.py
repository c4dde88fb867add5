"""Prefect settings for runs started from this project, and one server for a whole pipeline.

Without ``PREFECT_API_URL`` each command starts Prefect's temporary local server on the SQLite
database under ``PREFECT_HOME`` (``.prefect/`` in the working directory by default), so
``PREFECT_HOME=.prefect prefect server start`` later shows every run in the UI. That costs a
server start per command, and the UI is browsable only afterwards; so `make repro` runs
``python -m pipeline.prefect_env serve -- dvc repro``, which starts one server on the same
database for all the stages and stops it at the end, and `weclip ui` (`make ui`) serves the
UI on that database.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server can take a while to start on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "INFO",
    # The stages' own warnings (pipeline.stage's log) in the run's log too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline",
}


def configure() -> None:
    """Set the defaults above (and PREFECT_HOME) unless the environment already has them."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():
        # Progress bars written to a log (dvc repro, CI) update every 10 s, not every step.
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))


def _local_server() -> tuple[str, list[str]]:
    """The API address of a server on this machine at PREFECT_SERVER_API_PORT, and the command
    that starts it on PREFECT_HOME. The port is 4200 by default here, not in configure(): the
    temporary servers take a free one."""
    port = os.environ.get("PREFECT_SERVER_API_PORT", "4200")
    return f"http://127.0.0.1:{port}/api", [sys.executable, "-m", "prefect", "server", "start",
                                            "--port", port]


def _answers(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start_server(api: str, command: list[str]) -> subprocess.Popen:
    """The server in the background, its output in PREFECT_HOME/server.log; returns once it
    answers."""
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    while not _answers(api):
        if server.poll() is not None or time.monotonic() > deadline:
            server.terminate()
            raise SystemExit(f"error: the Prefect server did not start; see {log}")
        time.sleep(0.5)
    return server


def serve(command: list[str]) -> int:
    """Run ``command`` with every Prefect run in it reporting to one server; its exit code.

    The server is PREFECT_API_URL's when set, else a local one (_local_server): the one already
    answering (`make ui` in another terminal), or one started for the command and stopped
    after it, whatever the command's outcome.
    """
    configure()
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.run(command).returncode
    api, start = _local_server()
    server = None if _answers(api) else _start_server(api, start)
    print(f"Prefect UI at {api.removesuffix('/api')} (runs on {os.environ['PREFECT_HOME']})",
          flush=True)
    try:
        return subprocess.run(command, env={**os.environ, "PREFECT_API_URL": api}).returncode
    finally:
        if server:
            server.terminate()
            server.wait()


def ui() -> int:
    """Serve the UI on PREFECT_HOME in the foreground, unless a server already answers."""
    configure()
    api, start = _local_server()
    if os.environ.get("PREFECT_API_URL"):
        print(f"PREFECT_API_URL is set: the runs are on {os.environ['PREFECT_API_URL']}")
    elif _answers(api):
        print(f"a Prefect server is already running: open {api.removesuffix('/api')}")
    else:
        return subprocess.run(start).returncode  # it prints the address; Ctrl-C stops it
    return 0


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["serve", "--", *command] if command:
            sys.exit(serve(command))
        case _:
            sys.exit("usage: python -m pipeline.prefect_env serve -- COMMAND...")
