"""Turning evaluation results into reports: IoU tables, DVC metrics and plots, pictures.

Plain functions, no Prefect: the evaluate stage calls them with confusion matrices (rows =
ground truth, columns = prediction, as ``weclip.metrics.confusion_matrix`` makes them) and
label maps following the data contract of ``weclip.dataset`` (0 background, 1..C the classes,
255 ignore). Every file is written to a temporary name and renamed into place, so an
interrupted stage never leaves a half-written report for DVC to pick up.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageOps

from weclip.metrics import iou, mean_iou
from weclip.files import write_atomically

IGNORE_INDEX = 255
# VOC's own palette gives 255 a pale cream (224, 224, 192); white reads better on overlays.
IGNORE_COLOUR = (255, 255, 255)
MIOU_ROW = "mIoU"


# ----------------------------------------------------------------------------- tables


def iou_table(confusions: dict[str, np.ndarray | torch.Tensor],
              class_names: list[str]) -> pd.DataFrame:
    """Per-class IoU in percent (1 decimal): one row per class, one column per variant.

    ``confusions`` maps a variant name (e.g. 'prediction', '+ CRF') to its
    [C + 1, C + 1] confusion matrix; ``class_names`` are the C foreground names
    (``ClassInfo.classes``). Rows are 'background', the classes, then 'mIoU'. A class absent
    from both ground truth and prediction is NaN and left out of the mean, as in
    ``weclip.metrics.mean_iou``; the mean is taken before rounding.
    """
    rows = ["background", *class_names]
    columns = {}
    for variant, confusion in confusions.items():
        confusion = torch.as_tensor(confusion)
        if confusion.shape != (len(rows), len(rows)):
            raise ValueError(f"{variant!r}: confusion matrix is {tuple(confusion.shape)}, "
                             f"expected {len(rows)} x {len(rows)} (background + classes)")
        columns[variant] = [*(100 * iou(confusion)).tolist(), 100 * mean_iou(confusion)]
    table = pd.DataFrame(columns, index=pd.Index([*rows, MIOU_ROW], name="class"), dtype=float)
    return table.round(1)


def write_tables(table: pd.DataFrame, out_dir: str | Path, name: str = "iou") -> tuple[Path, Path]:
    """Write ``table`` as ``out_dir/name.csv`` and ``out_dir/name.md``; returns both paths.

    In the CSV a NaN is an empty cell; in the markdown it is '-', with one decimal throughout.
    """
    out_dir = Path(out_dir)
    csv_path = write_atomically(out_dir / f"{name}.csv", table.to_csv)
    # tabulate prints NaN as 'nan' whatever ``missingval`` says; only None counts as missing.
    markdown = table.astype(object).where(table.notna(), None).to_markdown(
        floatfmt=".1f", missingval="-")
    md_path = write_atomically(out_dir / f"{name}.md", lambda tmp: tmp.write_text(markdown + "\n"))
    return csv_path, md_path


# ----------------------------------------------------------------------------- DVC metrics and plots


def _plain(value):
    """``value`` with numpy / torch scalars made Python numbers and NaN or inf made None.

    JSON has no NaN; Python would write a bare ``NaN`` that strict parsers reject.
    """
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write a nested dict of metrics as JSON for ``dvc metrics``, keys sorted.

    IoU values are percentages. The evaluate stage is to use these keys, so that
    ``dvc metrics diff`` compares like with like across revisions:

        val.miou               mIoU of the final prediction (multi-scale + flip + CRF)
        val.miou_no_crf        the same without CRF
        val.miou_single_scale  single scale, no flip, no CRF
        train.pseudo_miou      mIoU of the RFM-refined CAM pseudo labels on the train split
        ablation.<variant>     mIoU of each further IoU-table column (e.g. 'initial CAM')

    Any other nesting is written as given. NaN (e.g. no class present) becomes null.
    """
    text = json.dumps(_plain(metrics), indent=2, sort_keys=True) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_per_class_iou(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the per-class rows of an ``iou_table`` as CSV ``class,variant,iou`` (long format).

    One row per (class, variant) for a DVC bar template (x: iou, y: class); the mIoU row and
    NaN entries (classes absent from the split) are left out.
    """
    per_class = table.drop(index=MIOU_ROW, errors="ignore")
    long = per_class.reset_index().melt(id_vars="class", var_name="variant", value_name="iou")
    long = long.dropna(subset=["iou"])
    return write_atomically(path, lambda tmp: long.to_csv(tmp, index=False))


def write_confusion(confusion: np.ndarray | torch.Tensor, class_names: list[str],
                    path: str | Path) -> tuple[Path, Path | None]:
    """Write a confusion matrix as CSV ``actual,predicted,count,fraction`` and a PNG heatmap.

    One row per cell rather than per pixel (millions of rows): ``count`` is the number of
    pixels of class ``actual`` predicted as ``predicted``, ``fraction`` that count over all
    pixels of ``actual`` (0 for a class absent from the ground truth). DVC's built-in
    ``confusion`` templates count rows, so they would see 1 in every cell of this file; the
    heatmap, written next to it with suffix ``.png``, is the picture to give ``dvc plots``.
    It needs matplotlib; without it only the CSV is written and the PNG path is None.
    """
    counts = torch.as_tensor(confusion).cpu().long().numpy()
    names = ["background", *class_names]
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix is {counts.shape}, expected "
                         f"{len(names)} x {len(names)} (background + classes)")
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    cells = pd.DataFrame({
        "actual": np.repeat(names, len(names)),
        "predicted": np.tile(names, len(names)),
        "count": counts.ravel(),
        "fraction": fractions.ravel(),
    })
    csv_path = write_atomically(path, lambda tmp: cells.to_csv(tmp, index=False))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return csv_path, None
    # A bare Figure, not pyplot: no global state and no display backend in a worker.
    size = 2 + 0.35 * len(names)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=90)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    figure.colorbar(image, ax=axes, label="fraction of actual class")
    png_path = write_atomically(Path(path).with_suffix(".png"),
                                 lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return csv_path, png_path


# ----------------------------------------------------------------------------- pictures


def palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC colours of ids 0..n-1 as uint8 [n, 3]; id 255 (ignore) is white.

    The VOC bit shuffle: bit k of the id's bits 0, 1, 2 (then 3, 4, 5, ...) goes to bit 7 - k
    of red, green and blue, so 0 is black, 1 (128, 0, 0), 2 (0, 128, 0), 15 (192, 128, 128).
    """
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    if n > IGNORE_INDEX:
        colours[IGNORE_INDEX] = IGNORE_COLOUR
    return colours


def _label_array(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """A label map as uint8, refusing ids a palette index cannot hold."""
    mask = torch.as_tensor(mask).cpu().numpy()
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"label ids must lie in 0..255, got {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend the VOC colours of ``mask`` [H, W] into ``image`` (uint8 [H, W, 3]) -> uint8 [H, W, 3].

    ``alpha`` is the weight of the mask colour. Background (black) is blended too, which dims
    it and makes the objects stand out.
    """
    image = np.asarray(image)
    mask = _label_array(mask)
    if image.shape != (*mask.shape, 3):
        raise ValueError(f"image {image.shape} does not match mask {mask.shape}")
    blended = (1 - alpha) * image.astype(np.float32) + alpha * palette()[mask].astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_palette_png(mask: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Save a label map [H, W] as a 'P'-mode PNG with the VOC palette, as VOC masks are stored.

    The pixel values are the class ids; the palette only colours them for viewers.
    """
    picture = Image.fromarray(_label_array(mask))
    picture.putpalette(palette().tobytes())  # an 'L' image becomes 'P' with the same values
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_image(image: np.ndarray, path: str | Path) -> Path:
    """Save an RGB uint8 [H, W, 3] image as PNG, atomically."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_qualitative(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
                      out_path: str | Path, cell: int = 256) -> Path:
    """Write one PNG grid of (image uint8 [H, W, 3], truth [H, W], prediction [H, W], image_id).

    One row per sample, columns image / ground truth overlay / prediction overlay, each fitted
    into a ``cell`` x ``cell`` square keeping its aspect ratio, under a header line naming the
    columns; the image id is written on the image.
    """
    header, titles = 20, ("image", "ground truth", "prediction")
    grid = Image.new("RGB", (3 * cell, header + len(samples) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((column * cell + 4, 4), title, fill="black")
    for row, (image, truth, prediction, image_id) in enumerate(samples):
        panels = (np.asarray(image), overlay(image, truth), overlay(image, prediction))
        top = header + row * cell
        for column, panel in enumerate(panels):
            grid.paste(ImageOps.contain(Image.fromarray(panel), (cell, cell)), (column * cell, top))
        left, upper, right, lower = draw.textbbox((4, top + 4), str(image_id))
        draw.rectangle((left - 2, upper - 2, right + 2, lower + 2), fill="black")
        draw.text((4, top + 4), str(image_id), fill="white")
    return write_atomically(out_path, lambda tmp: grid.save(tmp, format="PNG"))
