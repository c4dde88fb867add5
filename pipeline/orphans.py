"""Child processes that end with the process that started them, however it ends.

A stage starts helpers: DataLoader workers and the CRF pool (both from multiprocessing's fork
server), and a Prefect server. When the stage is killed (SIGKILL, a killed `dvc repro`), a
helper would live on, adopted by init, holding memory and ports. On Linux the kernel can send a
process a signal when its parent ends (``prctl(PR_SET_PDEATHSIG)``): every helper asks for
SIGKILL, the fork server too, so a chain of them ends with the stage. Elsewhere this does
nothing.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(*_) -> None:
    """Have this process killed when its parent ends (a DataLoader ``worker_init_fn``, a pool
    ``initializer`` or a ``preexec_fn``: any arguments are ignored)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def forkserver():
    """multiprocessing's forkserver context, its server set to end with this process.

    Workers forked from a process running threads (Prefect's, torch's) can deadlock, so the
    stages start theirs from a clean fork server; its preloaded module ``pipeline._forkserver``
    makes the server itself die with this process, and each worker calls ``die_with_parent``.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline._forkserver"])
    return context
