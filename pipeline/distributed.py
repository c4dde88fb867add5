"""torch.distributed plumbing shared by the stages.

A stage runs as one process by default; started by torchrun (or ``launch``) it runs as one
process per device: NCCL between GPUs, Gloo between CPU processes. Each rank handles its
``shard`` of the work, and rank 0 alone writes shared outputs (stores, reports, checkpoints)
while the others wait at a ``barrier``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist


def under_launcher() -> bool:
    """True in a process started by torchrun (which sets LOCAL_RANK for every worker)."""
    return "LOCAL_RANK" in os.environ


def init(device: torch.device) -> None:
    """Join the process group torchrun set up in the environment; no-op for one process.

    Idempotent: a second call, or a call after someone else initialised the group, does nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _initialised():
        return
    if device.type == "cuda":
        # NCCL binds each rank to the current device, so it must be this rank's GPU.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if _initialised() else 0


_this_rank = rank  # ``shard``'s argument shadows the function


def world_size() -> int:
    return dist.get_world_size() if _initialised() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialised():
        dist.barrier()


def local_device(name: str) -> torch.device:
    """``name`` as a device: 'auto' is cuda when available, else cpu; under torchrun a cuda
    device without an index is this process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and under_launcher():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard(items: Sequence, rank: int | None = None, world: int | None = None) -> Sequence:
    """The items this rank handles: every world-th item from the rank-th, items[rank::world]
    (round robin, so the ranks' shares differ by one item at most)."""
    rank = _this_rank() if rank is None else rank
    world = world_size() if world is None else world
    return items[rank::world]


def launch(nproc: int, argv: list[str], quiet: bool = True) -> dict[int, int]:
    """Run ``python -m <argv...>`` as ``nproc`` processes on this machine, as `torchrun
    --standalone --nproc-per-node <nproc>` does; returns the exit code of each failed rank
    ({} when all succeeded). ``quiet``: without the launcher's own log lines (its summary of
    failures included), so that the caller reports a failure its own way."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if quiet:
        for name, logger in logging.root.manager.loggerDict.items():
            if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
                logger.setLevel(logging.CRITICAL)
    # The cores shared between the processes (torchrun would give each one thread).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # A local rendezvous on a free port: no MASTER_ADDR/PORT to choose.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", *argv)
    except ChildFailedError as e:
        return {rank: failure.exitcode for rank, failure in e.failures.items()}
    return {}


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()
