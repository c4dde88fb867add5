"""DVC in throwaway projects: experiments keep their metrics and plots, so that they can be
compared; and editing a module reruns only the stages that use it.

A throwaway git + DVC project gets this project's train and evaluate outputs, metrics, plot
definitions and .gitignore exactly as dvc.yaml and .gitignore declare them, with stand-in
commands that write small files of the same names and columns in a second. Two
`dvc exp run -S` experiments must then show their own metrics in `dvc exp show --json`, and
`dvc plots diff` must render every plot of both. (With `cache: false` outputs under the
git-ignored reports/ and runs/, each experiment showed '!' and the diff failed.)
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
pytestmark = pytest.mark.skipif(not DVC or not shutil.which("git"), reason="needs dvc and git")

# Writes every file of one stage from outputs.json; the numbers follow train.seed, so that the
# experiments differ. Plain Python (no torch), so each stage takes a fraction of a second.
STAND_IN = r'''
import json, sys
from pathlib import Path

import yaml
from PIL import Image

stage = sys.argv[1]
seed = yaml.safe_load(open("params.yaml"))["train"]["seed"]
spec = json.loads(Path("outputs.json").read_text())
for path in spec["outputs"][stage]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name == "metrics.json":
        path.write_text(json.dumps({
            "val": {"miou": 80.0 + seed, "miou_no_crf": 70.0 + seed,
                    "miou_single_scale": 60.0 + seed},
            "train": {"pseudo_miou": 75.0 + seed},
            "ablation": {"initial CAM": 50.0 + seed, "+ CRF": 80.0 + seed}}))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"attention": {"foreground": {"block 1": 30.0 + seed}}}))
    elif path.suffix == ".csv":
        columns = spec["columns"].get(path.as_posix(), ["value"])
        rows = [",".join(columns)]
        for i in range(3):
            rows.append(",".join(f"class{i}" if c == "class" else str(10 * (i + 1) + seed)
                                 for c in columns))
        path.write_text("\n".join(rows) + "\n")
    elif path.suffix == ".png":
        Image.new("RGB", (8, 8), (10 * seed, 0, 0)).save(path)
    else:
        path.write_text(f"{stage} {seed}\n")
'''


def _interpolate(text: str, params: dict) -> str:
    """``text`` with dvc.yaml's ${group.key} references replaced from ``params``."""
    def value(match):
        found = params
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)
    return re.sub(r"\$\{([^}]+)\}", value, text)


def _names(entries) -> list[str]:
    """The paths of a dvc.yaml outs/metrics list (plain strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _plot_columns(plots: list, resolve) -> dict[str, list[str]]:
    """The columns each data file of dvc.yaml's top-level plots needs: x and its y fields."""
    columns: dict[str, list[str]] = {}
    for plot in plots:
        if isinstance(plot, str):
            continue
        (definition,) = plot.values()
        for path, fields in (definition.get("y") or {}).items():
            fields = [fields] if isinstance(fields, str) else list(fields)
            wanted = columns.setdefault(resolve(path), [])
            for field in [definition.get("x"), *fields]:
                if field and field not in wanted:
                    wanted.append(field)
    return columns


def _environment(tmp_path) -> dict:
    """An environment for dvc and git that reads no user or system configuration."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site"),
           "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "global"),
           "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "system"), "GIT_CONFIG_NOSYSTEM": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_BASELINE_REV"):
        env.pop(key, None)  # when the tests themselves run inside `dvc exp run`
    return env


def _run(*args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def project(tmp_path):
    """The throwaway project: (its folder, environment, its dvc.yaml as written, a function
    that resolves the ${...} of dvc.yaml's paths). Its params.yaml is this project's."""
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # for the ${...} in paths

    def resolve(path: str) -> str:
        return _interpolate(path, params)

    train, evaluate = real["stages"]["train"], real["stages"]["evaluate"]
    python = Path(sys.executable).as_posix()
    stages = {
        "train": {"cmd": f'"{python}" stand_in.py train', "deps": ["stand_in.py"],
                  "params": ["train.seed"], "outs": train["outs"]},
        "evaluate": {"cmd": f'"{python}" stand_in.py evaluate',
                     "deps": ["stand_in.py", "${train.out}/model.pt"],
                     "metrics": evaluate.get("metrics", []), "outs": evaluate.get("outs", []),
                     **({"plots": evaluate["plots"]} if "plots" in evaluate else {})},
    }
    dvc_yaml = {"stages": stages, "plots": real.get("plots", [])}
    spec = {"outputs": {name: [resolve(p) for p in _names(stage.get("outs"))
                               + _names(stage.get("metrics")) + _names(stage.get("plots"))]
                        for name, stage in stages.items()},
            "columns": _plot_columns(dvc_yaml["plots"], resolve)}

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "outputs.json").write_text(json.dumps(spec))
    (folder / "stand_in.py").write_text(STAND_IN)
    shutil.copy(ROOT / ".gitignore", folder / ".gitignore")

    env = _environment(tmp_path)
    git = ["git", "-c", "init.defaultBranch=main"]
    _run(*git, "init", "-q", cwd=folder, env=env)
    for key, value in (("user.name", "test"), ("user.email", "test@example.com"),
                       ("commit.gpgsign", "false")):
        _run("git", "config", key, value, cwd=folder, env=env)
    _run(DVC, "init", "-q", cwd=folder, env=env)
    _run(DVC, "repro", "-q", cwd=folder, env=env)
    _run("git", "add", "-A", cwd=folder, env=env)
    _run("git", "commit", "-q", "-m", "baseline", cwd=folder, env=env)
    return folder, env, dvc_yaml, resolve


@pytest.mark.slow
def test_two_experiments_keep_their_metrics_and_plots_diff_between_them(project):
    folder, env, dvc_yaml, resolve = project
    baseline = yaml.safe_load((folder / "params.yaml").read_text())["train"]["seed"]
    seeds = {"seed-a": baseline + 1, "seed-b": baseline + 2}
    for name, seed in seeds.items():
        _run(DVC, "exp", "run", "-q", "-n", name, "-S", f"train.seed={seed}", cwd=folder, env=env)

    shown = json.loads(_run(DVC, "exp", "show", "--json", cwd=folder, env=env))
    experiments = {rev["name"]: rev["data"]
                   for baseline in shown for exp in baseline.get("experiments") or []
                   for rev in exp["revs"]}
    assert set(experiments) == set(seeds)
    (metrics_file,) = map(resolve, _names(dvc_yaml["stages"]["evaluate"]["metrics"]))
    for name, seed in seeds.items():
        metrics = experiments[name]["metrics"]
        assert set(metrics) == {metrics_file}  # diagnostics.json is no metric
        data = metrics[metrics_file].get("data")
        assert data, f"{name}: {metrics[metrics_file]}"
        assert data["val"]["miou"] == 80.0 + seed
        assert data["val"]["miou_no_crf"] == 70.0 + seed
        assert data["train"]["pseudo_miou"] == 75.0 + seed
        assert experiments[name]["params"]["params.yaml"]["data"]["train"]["seed"] == seed

    diff = json.loads(_run(DVC, "plots", "diff", *seeds, "--json", cwd=folder, env=env))
    assert not diff.get("errors"), diff["errors"]
    plot_ids = {p if isinstance(p, str) else next(iter(p)) for p in dvc_yaml["plots"]}
    for plot_id in plot_ids:
        resolved = resolve(plot_id)
        assert resolved in diff["data"], f"no plot {resolved!r} in {sorted(diff['data'])}"
        revisions = {rev for rendered in diff["data"][resolved]
                     for rev in rendered.get("revisions", [])}
        assert revisions == set(seeds), f"{resolved}: {revisions}"


def test_every_vega_plot_has_a_title_and_axis_labels():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    for plot in plots:
        if isinstance(plot, str):
            assert plot.endswith((".png", ".svg", ".jpg")), plot
            continue
        (name, definition), = plot.items()
        for key in ("title", "x_label", "y_label"):
            assert definition.get(key), f"plot {name!r} has no {key}"


def test_every_image_plot_is_an_output_of_a_stage():
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outputs = {name for stage in real["stages"].values()
               for name in _names(stage.get("outs")) + _names(stage.get("plots"))}
    for plot in real["plots"]:
        if isinstance(plot, str):
            assert plot in outputs, f"{plot} is in plots but no stage writes it"


def test_no_uncached_output_is_ignored_by_git():
    """A `cache: false` output is in an experiment only if git tracks it; under a git-ignored
    folder (reports/, runs/) it would be in none."""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git work tree")
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    uncached = []
    for stage in real["stages"].values():
        entries = [*(stage.get("outs") or []), *(stage.get("metrics") or []),
                   *(stage.get("plots") or [])]
        for entry in entries:
            if isinstance(entry, dict) and (next(iter(entry.values())) or {}).get("cache") is False:
                uncached.append(_interpolate(next(iter(entry)), params))
    ignored = [path for path in uncached if subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0]
    assert not ignored, f"cache: false outputs that git ignores: {ignored}"


@pytest.fixture
def pipeline_copy(tmp_path):
    """This project's dvc.yaml, params.yaml and code in a throwaway DVC project whose dvc.lock
    records the current code (stand-in outputs, `dvc commit`): (its folder, environment)."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)
    for package in ("pipeline", "weclip"):
        shutil.copytree(ROOT / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for name in _names(stage.get("outs")) + _names(stage.get("metrics")):
            path = folder / _interpolate(name, params)
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("stand-in\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "stand-in").write_text("stand-in\n")
    env = _environment(tmp_path)
    _run(DVC, "init", "--no-scm", "-q", cwd=folder, env=env)
    _run(DVC, "commit", "--force", "-q", cwd=folder, env=env)
    return folder, env


@pytest.mark.parametrize("edited, up_to_date, stale", [
    ("weclip/decoder.py", {"prepare", "cache"}, {"train", "infer"}),
    ("pipeline/report.py", {"prepare", "cache", "train", "infer"}, {"evaluate"}),
    ("weclip/crf.py", {"prepare", "cache", "train"}, {"infer"}),
])
def test_editing_a_module_makes_only_the_stages_that_use_it_stale(pipeline_copy, edited,
                                                                     up_to_date, stale):
    folder, env = pipeline_copy
    assert json.loads(_run(DVC, "status", "--json", cwd=folder, env=env)) == {}
    with open(folder / edited, "a") as f:
        f.write("# edited\n")
    status = json.loads(_run(DVC, "status", "--json", cwd=folder, env=env))
    assert up_to_date.isdisjoint(status) and stale <= set(status), status
    for stage in stale:
        assert status[stage] == [{"changed deps": {edited: "modified"}}]
