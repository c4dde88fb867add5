"""params.yaml and the recipes: partial files over the defaults, rendered in full for DVC."""
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from pipeline.params import load_params, params_fingerprint, write_recipe

ROOT = Path(__file__).parent.parent


def test_params_yaml_is_the_world_recipe_in_full(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    written = write_recipe("world", tmp_path / "params.yaml")
    assert written.read_text() == (ROOT / "params.yaml").read_text()


def test_the_defaults_are_the_authors_voc_run():
    voc, defaults = load_params(ROOT / "params/voc.yaml"), load_params(None)
    assert voc.model.arch == "ViT-B-16-quickgelu" and voc.model.template == "a clean origami {}."
    assert (voc.train.iters, voc.train.crop_size, voc.model.box_threshold) == (30000, 320, 0.4)
    assert voc.train.rfm_start == 9144  # the reference's effective switch, not the paper's 15000
    assert (voc.train.split, voc.evaluate.pseudo_split) == ("train_aug", "train")
    assert voc.train == defaults.train and voc.model.decoder_dim == defaults.model.decoder_dim


def test_recipes_state_only_what_differs_from_the_defaults():
    defaults = asdict(load_params(None))
    for path in sorted((ROOT / "params").glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        for group, values in recipe.items():
            for key, value in values.items():
                assert value != defaults[group][key], f"{path.name} repeats {group}.{key}"


def test_coco_changes_the_schedule_and_the_refinement():
    coco = load_params(ROOT / "params/coco.yaml")
    assert (coco.train.iters, coco.train.rfm_start) == (80000, 40000)
    assert (coco.model.box_threshold, coco.model.rfm_layers) == (0.7, 10)


def test_the_plus_recipes_are_the_authors_weclip_plus_settings():
    voc, coco = (load_params(ROOT / f"params/{name}-plus.yaml") for name in ("voc", "coco"))
    for plus in (voc, coco):
        assert plus.model.dino.arch == "vit_small_patch14_dinov2"
        assert (plus.train.lr, plus.train.rfm_start, plus.train.dice_weight,
                plus.train.cross_weight) == (2e-5, 0, 1.0, 0.1)
        assert plus.infer.scales == [1.0, 1.5]
    assert (voc.model.cam_layer, voc.model.box_threshold, voc.train.self_training_start) == (
        -2, None, 18001)
    assert (coco.model.cam_layer, coco.model.box_threshold, coco.model.rfm_layers) == (-1, 0.7, 8)
    assert (coco.train.batch_size, coco.train.iters, coco.train.self_training_start,
            coco.infer.crf.iterations) == (8, 80000, 40001, 0)


def test_the_world_plus_recipe_is_the_world_recipe_with_the_small_dino_and_the_plus_switches():
    import dataclasses

    world, plus = (load_params(ROOT / f"params/{name}.yaml") for name in ("world", "world-plus"))
    assert plus.model.dino.weights == "weclip/pretrained/world-dino.safetensors"
    assert (ROOT / plus.model.dino.weights).is_file()
    switches = {"model": {"dino", "cam_layer", "box_threshold"},
                "train": {"rfm_start", "dice_weight", "cross_weight", "self_training_start"},
                "infer": {"scales"}}
    for group in dataclasses.fields(world):
        a, b = (dataclasses.asdict(getattr(p, group.name)) for p in (world, plus))
        differ = {k for k in a if a[k] != b[k]}
        assert differ == switches.get(group.name, set()), group.name


def test_a_missing_params_file_is_an_error():
    with pytest.raises(FileNotFoundError, match="no-such.yaml: parameters file not found"):
        load_params("no-such.yaml")


def test_overrides_change_the_fingerprint_of_their_group_only():
    base, changed = load_params(ROOT / "params.yaml"), load_params(ROOT / "params.yaml", {"infer.flip": False})
    assert params_fingerprint(base, ("train",)) == params_fingerprint(changed, ("train",))
    assert params_fingerprint(base, ("infer",)) != params_fingerprint(changed, ("infer",))


def test_the_fingerprint_follows_the_clip_weight_file_contents(tmp_path):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"one")
    params = load_params(ROOT / "params.yaml", {"model.weights": str(weights)})
    before = params_fingerprint(params, ("model",))
    weights.write_bytes(b"two")
    assert params_fingerprint(params, ("model",)) != before


@pytest.mark.slow
def test_the_wheel_finds_its_shipped_small_clip_from_any_folder(tmp_path):
    """Installed from a wheel, not from this checkout, the world recipe's CLIP weights (a path
    relative to the project) are found in the installed package."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside it
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if Path(folder) == ROOT and n not in (
            "pyproject.toml", "README.md", "weclip", "pipeline")] + ["__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("weclip-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True)
    code = ("import weclip.weights as w; from pathlib import Path\n"
            "path = Path(w.resolve_weights('weclip/pretrained/world-clip.safetensors'))\n"
            "print(path.is_file(), path.is_relative_to(Path.cwd().parent / 'site'))")
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path / "elsewhere",
                            env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True,
                            text=True)
    assert result.stdout.split() == ["True", "True"], result.stderr
