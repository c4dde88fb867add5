"""Files: writing them so that a reader never sees half of one, and their digests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from tqdm import tqdm

CHUNK = 1 << 20


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path`` (creating the parent folder).

    An interrupted write leaves the old ``path``, or none, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


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
