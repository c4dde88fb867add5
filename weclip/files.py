"""Files: writing them so that a reader never sees half of one, even on a full disk, and their
digests."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Callable

from tqdm import tqdm

CHUNK = 1 << 20


class NoSpaceError(ValueError):
    """A write failed for lack of space on the device; the message names the file, the space
    it needs (``bound`` 'over ' or 'up to ' when known only so far; none when 0) and the space
    free."""

    def __init__(self, path: Path, needed: int = 0, bound: str = ""):
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
        needed = f"{bound}{_size(needed)} needed, " if needed else ""
        super().__init__(f"{path}: no space left on its device ({needed}{_size(free)} free); "
                         "free some space and run again, which resumes")


def write_atomically(path: str | Path, content: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``content`` (bytes, text, or a function that writes the path it is given) to a
    temporary file beside ``path`` and rename it to ``path`` (creating the parent folder).

    An interrupted or failed write leaves the old ``path``, or none, never a partial file; on
    a full disk the temporary file is removed and NoSpaceError says how much space is needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = content.encode() if isinstance(content, str) else content
    try:
        data(tmp) if callable(data) else tmp.write_bytes(data)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if no_space(e):
            if callable(data):
                raise NoSpaceError(path, written, "over ") from None
            raise NoSpaceError(path, len(data)) from None
        raise
    os.replace(tmp, path)
    return path


def no_space(error: BaseException) -> bool:
    """Whether ``error`` is a write's failure for lack of space (or of quota)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def torch_bytes(obj) -> bytes:
    """``obj`` as torch.save writes it: written by write_atomically, whose disk errors torch's
    own file writer would hide."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


def file_digest(path: str | Path, algorithm: str = "sha256", progress: bool = False) -> str:
    """Hex digest of a file, read in chunks (with a progress bar when ``progress``)."""
    path = Path(path)
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"{algorithm} {path.name}", leave=False,
                                     disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
