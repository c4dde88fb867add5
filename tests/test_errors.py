"""Parameters are checked before any work starts: a wrong value is refused in one line that
names its key, the value and what is allowed, and the command line ends with that line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.params import load_params

ROOT = Path(__file__).parent.parent


def refusal(overrides: dict, needs=()) -> str:
    """The message with which the defaults under ``overrides`` are refused."""
    with pytest.raises(ValueError) as error:
        load_params(None, overrides, needs)
    return str(error.value)


def test_a_negative_iteration_count_is_refused_by_key():
    assert refusal({"train.iters": -5}) == "train.iters: -5 must be at least 1"


def test_a_value_of_another_type_is_refused_by_key():
    assert refusal({"train.iters": "abc"}) == "train.iters: 'abc' is not an integer"
    assert refusal({"train.amp": 1}) == "train.amp: 1 is not true or false"
    assert refusal({"infer.long_side": "big"}) == "infer.long_side: 'big' is not an integer or null"
    assert refusal({"model.par_dilations": [1, 2.5]}) == \
        "model.par_dilations: [1, 2.5] is not a list of integers"


def test_an_integer_is_a_number_but_a_yes_is_not():
    assert load_params(None, {"train.lr": 1}).train.lr == 1
    assert refusal({"train.lr": True}) == "train.lr: True is not a number"


OUT_OF_RANGE = [
    ({"train.batch_size": 0}, "train.batch_size: 0 must be a positive multiple of train.nproc (1)"),
    ({"train.nproc": 2, "train.batch_size": 3},
     "train.batch_size: 3 must be a positive multiple of train.nproc (2)"),
    ({"train.nproc": 0}, "train.nproc: 0 must be at least 1"),
    ({"cache.nproc": 0}, "cache.nproc: 0 must be at least 1"),
    ({"infer.nproc": 0}, "infer.nproc: 0 must be at least 1"),
    ({"train.crop_size": 16}, "train.crop_size: 16 must be between 32 and 2048"),
    ({"train.lr": 0}, "train.lr: 0 must be greater than 0"),
    ({"train.warmup_iters": -1}, "train.warmup_iters: -1 must be at least 0"),
    ({"train.log_every": 0}, "train.log_every: 0 must be at least 1"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every: 0 must be at least 1"),
    ({"train.eval_every": 0}, "train.eval_every: 0 must be at least 1"),
    ({"train.eval_images": 0}, "train.eval_images: 0 must be at least 1"),
    ({"train.workers": -1}, "train.workers: -1 must be at least 0"),
    ({"train.features": "disk"}, "train.features: 'disk' must be one of online, cache"),
    ({"train.supervision": "boxes"}, "train.supervision: 'boxes' must be one of pseudo, masks"),
    ({"train.scale_range": [2.0, 0.5]},
     "train.scale_range: [2.0, 0.5] must be two numbers [low, high] with 0 < low <= high"),
    ({"train.scale_range": [0.5]},
     "train.scale_range: [0.5] must be two numbers [low, high] with 0 < low <= high"),
    ({"train.betas": [0.9, 1]}, "train.betas: [0.9, 1] must be two numbers in [0, 1)"),
    ({"model.dropout": 1.5}, "model.dropout: 1.5 must be between 0 and 1"),
    ({"model.box_threshold": -0.1}, "model.box_threshold: -0.1 must be between 0 and 1"),
    ({"model.normalization": "laion"},
     "model.normalization: 'laion' must be one of imagenet, clip"),
    ({"model.decoder_heads": 7}, "model.decoder_heads: 7 must divide model.decoder_dim (256)"),
    ({"train.cross_weight": 0.1}, "train.cross_weight: 0.1 must be 0 without model.dino "
     "(WeCLIP has one branch), at least 0 with it"),
    ({"infer.scales": []}, "infer.scales: [] must be a non-empty list of numbers greater than 0"),
    ({"infer.scales": [1.0, 0]},
     "infer.scales: [1.0, 0] must be a non-empty list of numbers greater than 0"),
    ({"infer.long_side": 0}, "infer.long_side: 0 must be at least 1"),
    ({"train.device": "gpu"}, "train.device: 'gpu' must be auto, cpu, cuda or cuda:<index>"),
]


@pytest.mark.parametrize("overrides, message", OUT_OF_RANGE,
                         ids=[message.split(":")[0] for _, message in OUT_OF_RANGE])
def test_a_value_out_of_its_range_is_refused_by_key(overrides, message):
    assert refusal(overrides) == message


def test_null_is_allowed_where_the_type_is_optional():
    assert load_params(None, {"infer.long_side": None}).infer.long_side is None


def test_refinement_starts_anywhere_from_the_first_iteration_to_past_the_last():
    assert load_params(None, {"train.iters": 10, "train.rfm_start": 0}).train.rfm_start == 0
    # Equal to iters: static refinement throughout.
    assert load_params(None, {"train.iters": 10, "train.rfm_start": 10}).train.rfm_start == 10
    assert refusal({"train.iters": 10, "train.rfm_start": 11}) == \
        "train.rfm_start: 11 must be between 0 and train.iters (10)"
    assert refusal({"train.rfm_start": -1}) == \
        "train.rfm_start: -1 must be between 0 and train.iters (30000)"


def test_a_cuda_device_is_refused_where_there_is_none_by_a_command_that_uses_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert refusal({"train.device": "cuda"}, needs=["train.device"]) == \
        "train.device: 'cuda' is not a device of this machine (0 CUDA devices); use auto or cpu"
    # `weclip prepare` does not train: a params file set up for a GPU machine works there.
    assert load_params(None, {"train.device": "cuda"}).train.device == "cuda"


def test_a_cuda_index_must_be_one_of_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_params(None, {"infer.device": "cuda:1"}, needs=["infer.device"])
    assert refusal({"infer.device": "cuda:2"}, needs=["infer.device"]) == \
        "infer.device: 'cuda:2' is not a device of this machine (2 CUDA devices); use auto or cpu"


def test_an_unknown_architecture_is_refused_with_a_few_close_names_not_all():
    message = refusal({"model.arch": "ViT-B-61"})
    assert message.startswith("model.arch: 'ViT-B-61' must be an open_clip model config, e.g. ")
    assert "ViT-B-16," in message and len(message) < 150


def test_an_architecture_shipped_with_weclip_is_known():
    assert load_params(None, {"model.arch": "ViT-Tiny-8-128", "model.weights": None}).model.arch


def test_a_misspelt_pretrained_tag_is_refused_with_the_tags_of_the_architecture():
    assert refusal({"model.weights": "opnai"}) == (
        "model.weights: 'opnai' must be null, a weight file or a pretrained tag of "
        "ViT-B-16-quickgelu (openai, dfn2b, metaclip_400m, metaclip_fullcc)")


def test_a_weight_file_must_exist_only_for_a_command_that_loads_it():
    assert refusal({"model.weights": "data/ViT-B-16.pt"}, needs=["model.weights"]) == \
        "model.weights: 'data/ViT-B-16.pt' is not an existing file"
    # A recipe is written, and the data prepared, before the weights are in place.
    assert load_params(ROOT / "params/voc.yaml").model.weights == "data/pretrained/ViT-B-16.pt"


def test_the_shipped_weights_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_params(ROOT / "params.yaml", needs=["model.weights"]).model.weights


def weclip(*args: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_the_command_line_ends_with_the_one_line_error_before_starting_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = weclip("train", "-S", "train.iters=-5", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: train.iters: -5 must be at least 1"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".prefect").exists()  # refused before Prefect (or a model) started


@pytest.mark.slow
def test_a_missing_params_file_is_an_error_not_the_defaults(tmp_path):
    result = weclip("train", "-p", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: nope.yaml: parameters file not found"


def test_verbose_shows_the_traceback_above_the_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WECLIP_DEBUG", "0")  # restored after --verbose sets it
    result = CliRunner().invoke(app, ["--verbose", "train", "-p", "nope.yaml"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1] == "error: nope.yaml: parameters file not found"


def test_an_override_without_a_value_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "-S", "train.iters"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: --set 'train.iters': expected key=value"


@pytest.mark.slow
def test_a_failure_in_the_processes_of_nproc_ends_in_its_one_line_once(tmp_path, prefect_server):
    params = {"data": {"dataset": "world", "world": {"image_size": 64, "n_pretrain": 0,
                                                     "n_train": 1, "n_val": 1}},
              "model": {"arch": "ViT-Tiny-8-128", "weights": None},
              "train": {"split": "train", "batch_size": 2, "crop_size": 64, "nproc": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    assert weclip("prepare", cwd=tmp_path, env=env).returncode == 0
    result = weclip("train", cwd=tmp_path, env=env)  # each process finds too few images
    message = "error: data/prepared/world: split 'train' has 1 images, fewer than a batch"
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == message
    assert result.stderr.count("error: ") == 1
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
