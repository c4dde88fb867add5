"""The train stage: it learns, logs, checkpoints and resumes where it stopped."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import read_rows
from pipeline.params import load_params
from pipeline.train import train
from weclip import load_model


def test_training_writes_model_losses_and_evaluations(toy_params, tmp_path):
    from pipeline.scoring import score
    from weclip.dataset import EvalDataset
    from weclip.metrics import mean_iou

    params = toy_params(tmp_path / "run")
    model = load_model(train(params))
    assert model.classes.classes == ["red", "blue"]
    assert [int(r["iteration"]) for r in read_rows(tmp_path / "run" / "losses.csv")] == [1, 2, 3, 4, 5, 6]
    evals = read_rows(tmp_path / "run" / "eval.csv")
    assert [int(r["iteration"]) for r in evals] == [2, 4, 6]
    # The last evaluation is the saved model's, scored again here.
    confusion = score(model, EvalDataset(params.dataset_dir, "val"), "cpu")
    assert float(evals[-1]["val_miou"]) == round(100 * mean_iou(confusion["prediction"]), 2)
    assert float(evals[-1]["train_pseudo_miou"]) == round(100 * mean_iou(score(
        model, EvalDataset(params.dataset_dir, "train"), "cpu", 2)["pseudo"]), 2)


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(
        toy_params, tmp_path):
    whole = toy_params(tmp_path / "whole")
    train(whole)

    def interrupt(iteration, row):
        if iteration == 4:
            raise KeyboardInterrupt

    broken = toy_params(tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt):
        train(broken, on_eval=interrupt)
    assert not (tmp_path / "broken" / "model.pt").exists()
    train(broken)

    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)["decoder"]
    b = torch.load(tmp_path / "broken" / "model.pt", weights_only=False)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_rows(tmp_path / "whole" / "losses.csv") == read_rows(tmp_path / "broken" / "losses.csv")


def test_unknown_params_are_refused_by_name(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  itres: 5\n")
    with pytest.raises(ValueError, match=r"params.yaml.train: unknown key\(s\) itres"):
        load_params(path)


def test_training_from_the_feature_cache(toy_params, tmp_path):
    from pipeline.cache import write_cache
    from weclip import FrozenCLIP

    params = toy_params(tmp_path / "run",
                        features="cache", iters=2)
    params.cache.path = str(tmp_path / "cache.zarr")
    write_cache(FrozenCLIP.from_config(params.model), params.dataset_dir,
                "train", params.cache.path, size=64, progress=False)
    train(params)
    assert len(read_rows(tmp_path / "run" / "losses.csv")) == 2


@pytest.mark.slow
def test_inference_writes_three_variants_and_resumes(toy_params, tmp_path):
    from pipeline.infer import VARIANTS, infer

    params = toy_params(tmp_path / "run", iters=2)
    model = train(params)
    params.infer.out, params.infer.long_side, params.infer.workers = str(tmp_path / "infer"), 64, 1
    out = infer(params, model)
    for variant in VARIANTS:
        masks = sorted((out / variant).glob("*.png"))
        assert [m.stem for m in masks] == ["6", "7"]
        assert np.asarray(Image.open(masks[0])).shape == (64, 64)
    pseudo = sorted((out / "pseudo").glob("*.png"))
    assert [m.stem for m in pseudo] == ["0", "1", "2", "3", "4", "5"]  # the train split's
    first = (out / "crf" / "6.png").stat().st_mtime_ns
    (out / "crf" / "7.png").unlink()
    infer(params, model)
    assert (out / "crf" / "7.png").exists() and (out / "crf" / "6.png").stat().st_mtime_ns == first


@pytest.mark.slow
def test_evaluation_reports_every_step_of_the_method(toy_params, tmp_path):
    import json

    from pipeline.evaluate import CAM_STEPS, PREDICTIONS, evaluate
    from pipeline.infer import infer

    params = toy_params(tmp_path / "run", iters=2)
    model = train(params)
    params.infer.out, params.infer.long_side, params.infer.workers = str(tmp_path / "infer"), 64, 1
    params.evaluate.out, params.evaluate.qualitative = str(tmp_path / "reports"), 2
    infer(params, model)
    metrics, table = evaluate(params, model)
    assert list(table.index)[-1] == "mIoU"
    assert set(metrics["ablation"]) == set(CAM_STEPS) | set(PREDICTIONS)
    for side in ("foreground", "background"):
        assert {"block 1", "static walk", "RFM walk", "uniform"} <= set(metrics["attention"][side])
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["val"]["miou"] == metrics["val"]["miou"]
    for name in ("iou.csv", "iou.md", "per_class_iou.csv", "confusion.csv", "qualitative.png"):
        assert (tmp_path / "reports" / name).exists()


def test_a_checkpoint_of_other_parameters_is_not_resumed(toy_params, tmp_path):
    train(toy_params(tmp_path / "run", iters=2))
    train(toy_params(tmp_path / "run", iters=3, lr=1e-5))
    assert [int(r["iteration"]) for r in read_rows(tmp_path / "run" / "losses.csv")] == [1, 2, 3]
    assert float(read_rows(tmp_path / "run" / "losses.csv")[0]["lr"]) < 1e-4  # 1e-3 at the old rate


def test_predict_segments_loose_files_and_names_unreadable_ones(toy_params, toy_dataset, tmp_path):
    from pipeline.infer import predict_files

    params = toy_params(tmp_path / "run", iters=1)
    model = train(params)
    params.infer.long_side = 64
    image = toy_dataset / "prepared" / "toy" / "6.png"
    written = predict_files(model, [image], tmp_path / "out", params.infer)
    assert [p.name for p in written] == ["6.png"]
    assert Image.open(tmp_path / "out" / "6_overlay.png").size == (64, 64)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        predict_files(model, [broken], tmp_path / "out", params.infer)


def test_the_upper_bound_trains_on_masks_without_the_cam_branch(
        toy_params, tmp_path, monkeypatch):
    import weclip.model

    def fail(*args, **kwargs):
        raise AssertionError("CAM computed for a fully supervised step")

    params = toy_params(tmp_path / "run", iters=2,
                        supervision="masks", eval_every=100)
    monkeypatch.setattr(weclip.model, "grad_cam", fail)
    train(params)
    assert len(read_rows(tmp_path / "run" / "losses.csv")) == 2


def test_the_upper_bound_learns_the_true_masks_even_where_the_run_self_trains(
        plus_params, tmp_path, monkeypatch):
    from pipeline.train import train_upper_bound
    from weclip.training import TrainStep

    calls = []
    step = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, batch, **kw: (
        calls.append(kw["self_training"]), step(self, batch, **kw))[1])
    params = plus_params(tmp_path / "run", iters=2, self_training_start=0, eval_every=100)
    params.upper_bound.enabled, params.upper_bound.out = True, str(tmp_path / "bound")
    train_upper_bound(params)
    assert calls == [False, False]


@pytest.mark.slow
def test_weclip_plus_trains_infers_and_evaluates_through_the_stages(plus_params, tmp_path):
    from pipeline.evaluate import evaluate
    from pipeline.infer import infer
    from weclip import WeCLIPPlus

    params = plus_params(tmp_path / "run")  # self-training from iteration 4 of 6
    model = train(params)
    assert isinstance(load_model(model), WeCLIPPlus)
    assert [int(r["iteration"]) for r in read_rows(tmp_path / "run" / "losses.csv")] == [1, 2, 3, 4, 5, 6]
    params.infer.out, params.infer.long_side, params.infer.workers = str(tmp_path / "infer"), 64, 1
    params.evaluate.out = str(tmp_path / "reports")
    out = infer(params, model)
    assert sorted(p.stem for p in (out / "crf").glob("*.png")) == ["6", "7"]
    metrics, _ = evaluate(params, model)
    assert 0 <= metrics["val"]["miou"] <= 100
