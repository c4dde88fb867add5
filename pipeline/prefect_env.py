"""Prefect settings for runs started from this project.

Without ``PREFECT_API_URL`` each command starts Prefect's temporary local server on the SQLite
database under ``PREFECT_HOME`` (``.prefect/`` in the working directory by default), so
``PREFECT_HOME=.prefect prefect server start`` later shows every run in the UI.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server can take a while to start on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "INFO",
}


def configure() -> None:
    """Set the defaults above (and PREFECT_HOME) unless the environment already has them."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():
        # Progress bars written to a log (dvc repro, CI) update every 10 s, not every step.
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
