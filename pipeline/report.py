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

from weclip.files import write_atomically
from weclip.images import IGNORE_INDEX, label_array, overlay, palette
from weclip.metrics import iou, mean_iou

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
    md_path = write_atomically(out_dir / f"{name}.md", markdown + "\n")
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


# The groups of metrics.json, in this order: what `dvc metrics` and `dvc exp show` compare.
HEADLINE_GROUPS = ("val", "train", "ablation")


def split_metrics(results: dict) -> tuple[dict, dict]:
    """Split the evaluate stage's results into (headline, diagnostics).

    ``headline`` holds the groups of HEADLINE_GROUPS (those present, in that order), for
    ``metrics.json``; ``diagnostics`` everything else (e.g. ``attention``, one value per block
    and walk), for ``diagnostics.json``, which is an output but not a DVC metric, so that
    ``dvc exp show`` keeps a column per headline figure instead of dozens of diagnostics.
    """
    headline = {group: results[group] for group in HEADLINE_GROUPS if group in results}
    diagnostics = {key: value for key, value in results.items() if key not in HEADLINE_GROUPS}
    return headline, diagnostics


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write a nested dict of metrics as JSON for ``dvc metrics``.

    IoU values are percentages. The evaluate stage is to use these keys, so that
    ``dvc metrics diff`` compares like with like across revisions:

        val.miou               mIoU of the final prediction (multi-scale + flip + CRF)
        val.miou_no_crf        the same without CRF
        val.miou_single_scale  single scale, no flip, no CRF
        train.pseudo_miou      mIoU of the RFM-refined CAM pseudo labels on the train split
        ablation.<variant>     mIoU of each further IoU-table column (e.g. 'initial CAM')

    The top-level groups come in the order of HEADLINE_GROUPS, then any others sorted; keys
    within a group keep the order given. DVC makes its columns in the file's order, so
    ``val.miou`` is the first metric column of ``dvc exp show``. Any other nesting is written
    as given (``diagnostics.json`` is written with this function too). NaN (e.g. no class
    present) becomes null.
    """
    order = [g for g in HEADLINE_GROUPS if g in metrics] + sorted(
        str(k) for k in metrics if k not in HEADLINE_GROUPS)
    ordered = {key: metrics[key] for key in order}
    text = json.dumps(_plain(ordered), indent=2) + "\n"
    return write_atomically(path, text)


def write_per_class_iou(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the per-class rows of an ``iou_table`` as CSV ``class,variant,iou`` (long format).

    One row per (class, variant) for a DVC bar template (x: iou, y: class); the mIoU row and
    NaN entries (classes absent from the split) are left out.
    """
    per_class = table.drop(index=MIOU_ROW, errors="ignore")
    long = per_class.reset_index().melt(id_vars="class", var_name="variant", value_name="iou")
    long = long.dropna(subset=["iou"])
    return write_atomically(path, lambda tmp: long.to_csv(tmp, index=False))


def write_variant_iou(table: pd.DataFrame, variant: str, path: str | Path) -> Path:
    """Write one column of an ``iou_table`` as CSV ``class,iou``: one row per class, in the
    table's order, without the mIoU row and NaN entries.

    This is what DVC's bar template draws as one bar per class (and, in ``dvc plots diff``,
    one bar per class and revision side by side); the long file of every variant would
    stack all the variants' bars of a class into one.
    """
    if variant not in table.columns:
        raise ValueError(f"no column {variant!r} in the IoU table (has {list(table.columns)})")
    column = table[variant].drop(index=MIOU_ROW, errors="ignore").dropna()
    rows = pd.DataFrame({"class": column.index, "iou": column.to_numpy()})
    return write_atomically(path, lambda tmp: rows.to_csv(tmp, index=False))


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


# ----------------------------------------------------------------------------- static charts
#
# The same charts as dvc.yaml's vega plots, as PNGs: `dvc plots show` writes HTML that loads
# the vega scripts from a CDN, so offline its vega charts stay empty; these images render
# anywhere (and appear in that HTML too, as image plots). Bare Figures, not pyplot: no global
# state and no display backend in a worker.


def _save_figure(figure, path: str | Path) -> Path:
    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def _no_data(axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no data: {what}", ha="center", va="center",
              transform=axes.transAxes, color="grey")


def write_line_chart(data: pd.DataFrame | str | Path, x: str, ys: Sequence[str],
                     path: str | Path, *, title: str, x_label: str, y_label: str) -> Path:
    """Write a PNG line chart of the columns ``ys`` of a CSV (or DataFrame) against ``x``.

    A missing or empty file, or a missing column, gives a chart that says so instead of an
    error, so that the stage's output always exists.
    """
    from matplotlib.figure import Figure

    frame, what = None, None
    if isinstance(data, pd.DataFrame):
        frame = data
    elif Path(data).is_file() and Path(data).stat().st_size:
        frame = pd.read_csv(data)
    else:
        what = f"{Path(data).name} not found"
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    drawn = False
    if frame is not None and x in frame.columns:
        for y in ys:
            if y in frame.columns and frame[y].notna().any():
                axes.plot(frame[x], frame[y], label=y, marker="o" if len(frame) < 20 else None)
                drawn = True
    if drawn:
        axes.legend()
        axes.grid(alpha=0.3)
    else:
        _no_data(axes, what or f"no rows of {', '.join(ys)}")
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    return _save_figure(figure, path)


def write_bar_chart(table: pd.DataFrame, variant: str, path: str | Path, *, title: str,
                    x_label: str = "IoU (%)", y_label: str = "class") -> Path:
    """Write a PNG of horizontal bars, one per class, of one column of an ``iou_table``
    (mIoU drawn as a dashed line, NaN classes left out), each bar labelled with its value."""
    from matplotlib.figure import Figure

    column = table[variant].drop(index=MIOU_ROW, errors="ignore").dropna()
    figure = Figure(figsize=(7, 1.2 + 0.35 * max(len(column), 1)), layout="constrained")
    axes = figure.add_subplot()
    if len(column):
        positions = np.arange(len(column))
        axes.barh(positions, column.to_numpy(), color="#4c72b0")
        axes.set_yticks(positions, [str(name) for name in column.index])
        axes.invert_yaxis()  # the table's first row on top
        for position, value in zip(positions, column.to_numpy()):
            axes.text(value + 1, position, f"{value:.1f}", va="center", fontsize=8)
        if MIOU_ROW in table.index and pd.notna(table.loc[MIOU_ROW, variant]):
            miou = table.loc[MIOU_ROW, variant]
            axes.axvline(miou, color="black", linestyle="--", linewidth=1)
            axes.text(miou, 1.01, f"mIoU {miou:.1f}", transform=axes.get_xaxis_transform(),
                      ha="center", va="bottom", fontsize=8)
        axes.set_xlim(0, 110)
        axes.grid(axis="x", alpha=0.3)
    else:
        _no_data(axes, f"no class scored in {variant!r}")
    axes.set_title(title, pad=14)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    return _save_figure(figure, path)


FINAL_TITLE = "Per-class IoU of the final prediction (multi-scale + flip + CRF)"
# The static charts of the evaluate stage: file name, the train stage's CSV, x, ys, title,
# axis labels; the same as dvc.yaml's vega plots of those CSVs.
LINE_CHARTS = (
    ("losses.png", "losses.csv", "iteration", ("loss", "seg_loss", "aff_loss"),
     "Training losses", "iteration", "loss"),
    ("periodic_evaluation.png", "eval.csv", "iteration", ("train_pseudo_miou", "val_miou"),
     "Periodic evaluation during training", "iteration", "mIoU (%)"),
)


def write_charts(table: pd.DataFrame, final: str, train_out: str | Path, out_dir: str | Path,
                 final_title: str = FINAL_TITLE) -> list[Path]:
    """Write the PNGs of dvc.yaml's vega plots into ``out_dir``, to view them offline:
    ``losses.png`` and ``periodic_evaluation.png`` from the train stage's CSVs in
    ``train_out`` (a chart saying 'no data' where there is none), and ``per_class_iou.png``,
    the IoU per class of the ``final`` column of ``table`` under ``final_title``. Returns
    their paths."""
    out_dir, train_out = Path(out_dir), Path(train_out)
    paths = [write_line_chart(train_out / csv, x, ys, out_dir / name, title=title,
                              x_label=x_label, y_label=y_label)
             for name, csv, x, ys, title, x_label, y_label in LINE_CHARTS]
    paths.append(write_bar_chart(table, final, out_dir / "per_class_iou.png", title=final_title,
                                 x_label="IoU (%)", y_label="class"))
    return paths


# ----------------------------------------------------------------------------- pictures


QUALITATIVE_TITLES = ("image", "ground truth", "prediction (multi-scale + flip + CRF)")


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels where possible."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def class_name(label: int, class_names: Sequence[str] | None) -> str:
    """The name of label id ``label``: 'background' for 0, 'ignore' for 255, else
    ``class_names[label - 1]`` (the C foreground names), or 'class <id>' without them."""
    if label == 0:
        return "background"
    if label == IGNORE_INDEX:
        return "ignore"
    if class_names is not None and label <= len(class_names):
        return str(class_names[label - 1])
    return f"class {label}"


def write_qualitative(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
                      out_path: str | Path, cell: int = 256,
                      class_names: Sequence[str] | None = None,
                      titles: Sequence[str] = QUALITATIVE_TITLES, outline: int = 1) -> Path:
    """Write one PNG grid of (image uint8 [H, W, 3], truth [H, W], prediction [H, W], image_id).

    One row per sample, columns image / ground truth overlay / prediction overlay, each fitted
    into a ``cell`` x ``cell`` square keeping its aspect ratio; a header names the columns
    (``titles``: by default the prediction column says it is the final one, multi-scale + flip
    + CRF, which is what the evaluate stage passes), and the image id is written on the image.
    The overlays are computed at the size shown, masks resized nearest, with class borders
    outlined (``overlay``'s ``outline``) so they stay visible on objects of their own colour.
    Under the grid, a legend: a swatch of the colour of every label found in the truths and
    predictions, with its name (``class_names``: the C foreground names, index 0 = label 1).
    """
    if len(titles) != 3:
        raise ValueError(f"three column titles are needed, got {len(titles)}")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = 12
    title_lines = [_wrap(measure, title, cell - 8) for title in titles]
    header = 8 + line_height * max(len(lines) for lines in title_lines)

    labels = sorted({int(v) for _, truth, prediction, _ in samples
                     for v in np.unique(np.concatenate([label_array(truth).ravel(),
                                                        label_array(prediction).ravel()]))})
    swatch, gap, pad, row_height = 12, 4, 6, 18
    entries, x, rows = [], pad, 0
    for label in labels:
        name = class_name(label, class_names)
        width = swatch + gap + int(np.ceil(measure.textlength(name))) + 2 * pad
        if entries and x + width > 3 * cell:
            x, rows = pad, rows + 1
        entries.append((label, name, x, rows))
        x += width
    legend = (pad + (rows + 1) * row_height + pad) if labels else 0

    top_of_legend = header + len(samples) * cell
    grid = Image.new("RGB", (3 * cell, top_of_legend + legend), "white")
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(title_lines):
        for number, line in enumerate(lines):
            draw.text((column * cell + 4, 4 + number * line_height), line, fill="black")
    for row, (image, truth, prediction, image_id) in enumerate(samples):
        image = np.asarray(image, dtype=np.uint8)
        for mask in (truth, prediction):
            if tuple(np.shape(mask)) != image.shape[:2] or image.ndim != 3:
                raise ValueError(f"{image_id}: image {image.shape} does not match mask "
                                 f"{tuple(np.shape(mask))}")
        shown = ImageOps.contain(Image.fromarray(image), (cell, cell))
        size = shown.size
        picture = np.asarray(shown)
        masks = [np.asarray(Image.fromarray(label_array(m)).resize(size, Image.NEAREST))
                 for m in (truth, prediction)]
        panels = (picture, *(overlay(picture, m, outline=outline) for m in masks))
        top = header + row * cell
        for column, panel in enumerate(panels):
            grid.paste(Image.fromarray(panel), (column * cell, top))
        left, upper, right, lower = draw.textbbox((4, top + 4), str(image_id))
        draw.rectangle((left - 2, upper - 2, right + 2, lower + 2), fill="black")
        draw.text((4, top + 4), str(image_id), fill="white")
    colours = palette()
    for label, name, x, legend_row in entries:
        y = top_of_legend + pad + legend_row * row_height
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1),
                       fill=tuple(int(c) for c in colours[label]), outline="grey")
        draw.text((x + swatch + gap, y), name, fill="black")
    return write_atomically(out_path, lambda tmp: grid.save(tmp, format="PNG"))
