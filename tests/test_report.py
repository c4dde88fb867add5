"""Reports of the evaluate stage: IoU tables, metrics JSON, DVC plot data and pictures."""
import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.report import (QUALITATIVE_TITLES, iou_table, split_metrics, write_charts,
                             write_confusion, write_metrics, write_per_class_iou,
                             write_qualitative, write_tables, write_variant_iou)
from weclip.images import outline_mask, overlay, palette, save_label_map

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
    path = save_label_map(mask, tmp_path / "mask.png")
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
        assert im.width == 3 * 64
        assert im.height > 2 * 64  # a header above the rows, a legend below


def test_metrics_split_keeps_the_headline_and_moves_diagnostics_out():
    results = {"attention": {"foreground": {"block 1": 30.0}}, "ablation": {"initial CAM": 70.0},
               "train": {"pseudo_miou": 75.0}, "val": {"miou": 80.0, "miou_no_crf": 78.0}}
    headline, diagnostics = split_metrics(results)
    assert list(headline) == ["val", "train", "ablation"]
    assert diagnostics == {"attention": {"foreground": {"block 1": 30.0}}}


def test_metrics_json_puts_val_first_for_dvc_exp_show(tmp_path):
    metrics = {"ablation": {"static CAM": 1.0, "initial CAM": 2.0}, "zeta": {"a": 1},
               "train": {"pseudo_miou": 3.0}, "val": {"miou_no_crf": 4.0, "miou": 5.0}}
    loaded = json.loads(write_metrics(metrics, tmp_path / "metrics.json").read_text())
    assert list(loaded) == ["val", "train", "ablation", "zeta"]  # DVC's column order
    assert list(loaded["ablation"]) == ["static CAM", "initial CAM"]  # as given


def test_variant_iou_has_one_row_per_class_of_that_variant(table, tmp_path):
    rows = pd.read_csv(write_variant_iou(table, "prediction", tmp_path / "final.csv"))
    assert list(rows.columns) == ["class", "iou"]
    assert rows["class"].tolist() == ["background", "cat", "dog"]  # car is NaN, no mIoU row
    assert rows["iou"].tolist() == [33.3, 66.7, 0.0]
    with pytest.raises(ValueError, match="no column"):
        write_variant_iou(table, "+ flip", tmp_path / "other.csv")


def test_charts_are_written_with_or_without_training_curves(table, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "losses.csv").write_text("iteration,loss,seg_loss,aff_loss,lr\n1,2.0,1.5,0.5,0.1\n"
                                      "2,1.0,0.8,0.2,0.1\n")
    # no eval.csv: its chart says so instead of failing the stage
    paths = write_charts(table, "+ CRF", train, tmp_path / "reports")
    assert [p.name for p in paths] == ["losses.png", "periodic_evaluation.png",
                                       "per_class_iou.png"]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100


def test_outline_marks_both_sides_of_class_borders_only():
    mask = np.zeros((8, 8), int)
    mask[2:6, 2:6] = 1
    mask[0, :] = 255  # an ignore band on background: no outline
    edges = outline_mask(mask)
    assert edges[2, 2] and edges[1, 3] and edges[5, 5] and edges[6, 4]  # on the square's border
    assert not edges[3, 3] and not edges[4, 4]  # inside
    assert not edges[0, 6] and not edges[7, 7]  # background and ignore away from the square


def test_overlay_outlines_a_mask_on_an_object_of_its_own_colour():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[2:8, 2:8] = (128, 0, 0)  # a red object, class 1's colour
    mask = np.zeros((10, 10), int)
    mask[2:8, 2:8] = 1
    plain, outlined = overlay(image, mask), overlay(image, mask, outline=1)
    assert plain[2, 4].tolist() == plain[4, 4].tolist()  # the fill alone hides the border
    assert outlined[2, 4].tolist() == [255, 255, 255]  # dark fill: a white border
    assert outlined[1, 4].tolist() == [255, 255, 255]  # on both sides
    assert outlined[4, 4].tolist() == plain[4, 4].tolist()  # the inside keeps its fill
    assert outlined[0, 0].tolist() == plain[0, 0].tolist()  # far background untouched
    light = overlay(np.full((10, 10, 3), 255, dtype=np.uint8), mask, outline=1)
    assert light[2, 4].tolist() == [0, 0, 0]  # light fill: a black border


def _grid_with_an_apple(tmp_path, cell=128):
    """A one-row grid of a red apple (class 1) on grey, shown at twice its size; returns the
    grid as RGB and the row where the panels start (below the header)."""
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    image[16:48, 16:48] = (200, 20, 20)
    truth = np.zeros((64, 64), int)
    truth[16:48, 16:48] = 1
    prediction = np.zeros((64, 64), int)
    prediction[20:44, 20:44] = 1
    prediction[50:60, 4:14] = 3
    path = write_qualitative([(image, truth, prediction, "apple")], tmp_path / "q.png", cell=cell,
                             class_names=["apple", "lemon", "starfish"])
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    top = next(y for y in range(grid.shape[0]) if (grid[y, :cell] != 255).any(-1).all())
    return grid, top


def test_qualitative_grid_has_a_legend_of_the_classes_shown(tmp_path):
    grid, top = _grid_with_an_apple(tmp_path)
    legend = grid[top + 128:]
    assert legend.shape[0] > 10
    colours = palette()
    for label in (0, 1, 3):  # background, apple, starfish: in the truth or the prediction
        assert (legend == colours[label]).all(-1).sum() > 50, f"no swatch of label {label}"
    assert not (legend == colours[2]).all(-1).any()  # lemon is in neither


def test_qualitative_grid_outlines_the_regions(tmp_path):
    grid, top = _grid_with_an_apple(tmp_path)
    for column, edge in ((1, 32), (2, 40)):  # truth from pixel 16, prediction from 20 (x2)
        panel = grid[top:top + 128, column * 128:(column + 1) * 128]
        white = (panel == 255).all(-1)
        assert white[edge, 64] and white[edge - 1, 64]  # the apple's border, both sides
        assert not white[64, 64] and not white[10, 100]  # inside the apple, the background


def test_qualitative_titles_name_the_final_prediction():
    assert QUALITATIVE_TITLES == ("image", "ground truth", "prediction (multi-scale + flip + CRF)")


def test_qualitative_grid_refuses_a_mask_of_another_size(tmp_path):
    image = np.zeros((10, 12, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        write_qualitative([(image, np.zeros((10, 12), int), np.zeros((12, 10), int), "x")],
                          tmp_path / "q.png", cell=32)
