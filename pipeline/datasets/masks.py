"""Writing converted label masks, resumably.

Each mask is written to a temporary name and renamed into place, so an interrupted conversion
leaves only whole files; running it again skips the masks that already exist.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from weclip.images import save_label_map


def write_masks(jobs: Sequence[tuple[Path, Callable[[], np.ndarray]]], desc: str) -> None:
    """For each (path, render) job whose path does not exist yet, save ``render()`` there."""
    todo = [(path, render) for path, render in jobs if not path.exists()]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit=" masks") as bar:
        for path, render in todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_label_map(render(), path)
            bar.update()
