"""Reports of the evaluate stage: IoU tables, metrics JSON, DVC plot data and pictures."""
import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.report import (iou_table, overlay, palette, save_palette_png, write_confusion,
                             write_metrics, write_per_class_iou, write_qualitative, write_tables)

CLASSES = ["cat", "dog", "car"]
# Rows = truth, columns = prediction. IoU: background 1/3, cat 2/3, dog 0, car absent (NaN).
CONFUSION = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.fixture
def table():
    return iou_table({"prediction": CONFUSION, "+ CRF": torch.eye(4, dtype=torch.long)}, CLASSES)


def test_iou_table_is_percent_per_class_with_nan_aware_miou(table):
    assert list(table.index) == ["background", *CLASSES, "mIoU"]
    assert list(table.columns) == ["prediction", "+ CRF"]
    prediction = table["prediction"]
    assert prediction[["background", "cat", "dog"]].tolist() == [33.3, 66.7, 0.0]
    assert math.isnan(prediction["car"])
    assert prediction["mIoU"] == 33.3  # mean of the three present classes, car left out
    assert table["+ CRF"].tolist() == [100.0] * 5


def test_iou_table_rejects_a_matrix_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected 4 x 4"):
        iou_table({"prediction": np.eye(3)}, CLASSES)


def test_tables_round_trip_through_csv_and_markdown(table, tmp_path):
    csv_path, md_path = write_tables(table, tmp_path / "reports")
    pd.testing.assert_frame_equal(pd.read_csv(csv_path, index_col=0), table)
    markdown = md_path.read_text().splitlines()
    assert "prediction" in markdown[0] and "+ CRF" in markdown[0]
    assert len(markdown) == 2 + len(table)
    car = next(line for line in markdown if line.startswith("| car"))
    assert "-" in car and "nan" not in car
    assert not list(tmp_path.glob("reports/*.tmp"))


def test_metrics_json_loads_back_with_nan_as_null(tmp_path):
    metrics = {"val": {"miou": np.float64(61.2), "miou_no_crf": 59.0},
               "train": {"pseudo_miou": torch.tensor(70.5)}, "ablation": {"initial CAM": math.nan}}
    path = write_metrics(metrics, tmp_path / "metrics.json")
    assert json.loads(path.read_text()) == {
        "ablation": {"initial CAM": None}, "train": {"pseudo_miou": 70.5},
        "val": {"miou": 61.2, "miou_no_crf": 59.0}}


def test_per_class_iou_is_long_format_without_miou_or_nan(table, tmp_path):
    rows = pd.read_csv(write_per_class_iou(table, tmp_path / "per_class_iou.csv"))
    assert list(rows.columns) == ["class", "variant", "iou"]
    assert len(rows) == 3 + 4  # prediction: car is NaN; + CRF: all four classes
    cat = rows[(rows["class"] == "cat") & (rows["variant"] == "prediction")]
    assert cat["iou"].tolist() == [66.7]


def test_confusion_csv_has_a_row_per_cell_that_sums_up(tmp_path):
    csv_path, png_path = write_confusion(torch.as_tensor(CONFUSION), CLASSES, tmp_path / "conf.csv")
    cells = pd.read_csv(csv_path)
    assert list(cells.columns) == ["actual", "predicted", "count", "fraction"]
    assert len(cells) == 16 and cells["count"].sum() == CONFUSION.sum()
    by_class = cells.groupby("actual")
    assert by_class["count"].sum().to_dict() == {"background": 2, "cat": 2, "dog": 1, "car": 0}
    assert by_class["fraction"].sum().to_dict() == {"background": 1, "cat": 1, "dog": 1, "car": 0}
    row = cells[(cells["actual"] == "dog") & (cells["predicted"] == "background")]
    assert row["count"].tolist() == [1]
    if importlib.util.find_spec("matplotlib"):
        assert png_path == tmp_path / "conf.png"
        with Image.open(png_path) as im:
            assert im.format == "PNG"
    else:
        assert png_path is None


def test_palette_has_the_voc_colours():
    colours = palette(21)
    assert colours.shape == (21, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0]
    assert colours[1].tolist() == [128, 0, 0]
    assert colours[2].tolist() == [0, 128, 0]
    assert colours[15].tolist() == [192, 128, 128]
    assert palette()[255].tolist() == [255, 255, 255]


def test_palette_png_reads_back_as_the_same_ids(tmp_path):
    mask = np.array([[0, 1, 2], [15, 20, 255]])
    path = save_palette_png(mask, tmp_path / "mask.png")
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), mask)
        assert im.getpalette()[3:6] == [128, 0, 0]


def test_overlay_keeps_shape_and_dtype_and_blends():
    image = np.full((4, 5, 3), 200, dtype=np.uint8)
    mask = torch.zeros(4, 5, dtype=torch.long)
    mask[0, 0] = 1
    out = overlay(image, mask, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[0, 0].tolist() == [164, 100, 100]  # halfway to (128, 0, 0)
    assert out[1, 1].tolist() == [100, 100, 100]  # halfway to black background
    with pytest.raises(ValueError):
        overlay(image, np.full((4, 5), 300))


def test_qualitative_grid_has_a_row_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.zeros((h, w), int),
                np.ones((h, w), int), f"img{h}") for h, w in [(30, 40), (50, 20)]]
    path = write_qualitative(samples, tmp_path / "qualitative.png", cell=64)
    with Image.open(path) as im:
        assert im.size == (3 * 64, 20 + 2 * 64)
