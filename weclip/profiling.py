"""The phases of a training step, and what a step asks of a device: launched ops and host syncs.

A GPU runs what the host queues; the host pays a few microseconds per launched op, and every
read of a device value on the host (``.item()``, ``bool()``, ``torch.equal``, ``nonzero``, a copy
to the CPU) stops the queue until the device catches up. ``DispatchCounter`` counts both for the
code it wraps, on any device, the CPU included, which is how the CUDA path is held to its budget
on machines without a GPU (docs/scaling.md).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# The phases of a training step, in order: the ``phase`` ranges of the model and the step.
PHASES = ("backbone forward", "Grad-CAM", "refinement", "PAR", "decoder forward", "losses",
          "backward + optimiser")

_active: list[str] = []


class phase:
    """``with phase(name):`` marks a phase of the step, for torch's profiler (a
    ``record_function`` range) and for ``DispatchCounter``. Inside code that torch.compile
    traces it does nothing, so that it never breaks a graph."""

    def __init__(self, name: str):
        self.name = name
        self.range = None

    def __enter__(self):
        if not torch.compiler.is_compiling():
            self.range = record_function(self.name).__enter__()
            _active.append(self.name)
        return self

    def __exit__(self, *exc):
        if self.range is not None:
            _active.pop()
            self.range.__exit__(*exc)
            self.range = None


def current_phase() -> str:
    return _active[-1] if _active else "other"


# Ops that make the host wait for a device value (the copies to the CPU are counted apart).
SYNC_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique",
            "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
# Ops that launch nothing: tensor metadata, aliases and views (most views are recognised by
# their schema; ``_unsafe_view``, reshape's view of a fresh copy, is not).
METADATA_OPS = {"detach", "alias", "lift_fresh", "_unsafe_view", "sym_size", "sym_stride",
                "sym_numel", "sym_storage_offset", "is_same_size",
                "_has_compatible_shallow_copy_type"}
COPIES = {"_to_copy", "copy_"}


class DispatchCounter(TorchDispatchMode):
    """Count the ops launched and the host syncs of the code run within it, per ``phase``.

    A device value is a tensor on a device other than the CPU, a tensor given to ``device``
    (the model's parameters and buffers and a batch's tensors, when the device is the CPU),
    anything computed from one, and a tensor made with an explicit ``device=``. Everything else
    is host data (labels laid out by the collate function, AdamW's step counters): the host
    may read it freely. A launched op is any op that touches a device value and is neither a
    view nor a metadata op. A sync is a ``SYNC_OPS`` op on a device value, or a copy of one to
    the CPU, or a blocking copy of host memory that is not pinned to a GPU.
    """

    def __init__(self, device_tensors=()):
        super().__init__()
        self.launches: Counter[str] = Counter()
        self.syncs: Counter[tuple[str, str]] = Counter()
        self._device = WeakIdKeyDictionary()
        for t in device_tensors:
            self._device[t] = True

    def is_device_value(self, t: torch.Tensor) -> bool:
        return t.device.type != "cpu" or t in self._device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(self.is_device_value(t) for t in inputs)
        made_on_device = not inputs and kwargs.get("device") is not None
        name = func.overloadpacket.__name__
        if self._syncs(name, args, kwargs, on_device):
            self.syncs[current_phase(), name] += 1
        out = func(*args, **kwargs)
        if (on_device or made_on_device) and not func.is_view and name not in METADATA_OPS:
            self.launches[current_phase()] += 1
        if on_device or made_on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self._device[t] = True
        return out

    def _syncs(self, name: str, args, kwargs, on_device: bool) -> bool:
        if name in SYNC_OPS:
            return on_device
        if name not in COPIES:
            return False
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device") or source.device
        if source.device.type == "cuda" and torch.device(target).type == "cpu":
            return True  # a read of device memory by the host
        blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True))
        return (source.device.type == "cpu" and torch.device(target).type == "cuda"
                and blocking and not source.is_pinned())

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())
