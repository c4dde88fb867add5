"""Where a frozen backbone's weights come from: a local file, or a pretrained tag of the library
that builds the backbone (open_clip's 'openai', timm's DINOv2 tags), downloaded by that library.

One rule tells them apart everywhere (building a model, checking params): a name with a file
suffix or a path separator, or that exists as a file, is a file; any other name is a tag.
"""
from __future__ import annotations

import os
from pathlib import Path

# Weight files named relative to the project (the shipped small CLIP) are found from any
# working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_weights(weights: str | None) -> str | None:
    """A weight file as given if it exists, else relative to the project root if it exists
    there, else unchanged (a pretrained tag, or a missing file to report)."""
    if weights is None or Path(weights).exists():
        return weights
    shipped = PROJECT_ROOT / weights
    return str(shipped) if shipped.exists() else weights


def is_weight_file(weights: str) -> bool:
    """True when ``weights`` names a file (existing or not) rather than a pretrained tag."""
    return (bool(Path(weights).suffix) or os.sep in weights or "/" in weights
            or Path(resolve_weights(weights)).exists())
