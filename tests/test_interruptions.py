"""Stopping a stage: a signal stops it cleanly with its progress saved, kill -9 loses only the
unfinished step, a rerun ends as an uninterrupted run, and two runs never share a folder."""
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from PIL import Image

from helpers import files, read_rows, survivors

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # dvc and weclip of this environment
pytestmark = pytest.mark.slow

STAGE = """
import pickle, sys
params = pickle.load(open(sys.argv[2], "rb"))
from pipeline import {stage} as module
module.{stage}(params)
"""


@pytest.fixture
def run_python(tiny_arch_configs):
    """Start Python ``code`` with ``args`` (sys.argv[2:]) in a fresh process that knows the tiny
    architecture, as the CLI's ranks run a stage (without Prefect); marked so that ``kill``
    finds every process it starts."""
    marker = uuid.uuid4().hex

    def start(code, *args):
        code = f"import sys, open_clip\nopen_clip.add_model_config(sys.argv[1])\n{code}"
        process = subprocess.Popen([sys.executable, "-c", code, str(tiny_arch_configs),
                                    *map(str, args)], stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1",
                                        "WECLIP_TEST_RUN": marker})
        process.marker = marker
        return process

    return start


@pytest.fixture
def run_stage(run_python, tmp_path):
    """Start the function ``stage`` of pipeline.<stage> on params in a fresh process."""
    def start(stage, params):
        path = tmp_path / f"params-{time.monotonic_ns()}.pkl"
        path.write_bytes(pickle.dumps(params))
        return run_python(STAGE.format(stage=stage), path)

    return start


def wait_for_rows(process, csv_path, rows, timeout=120):
    """Wait until ``csv_path`` has ``rows`` data rows; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not (csv_path.exists() and len(csv_path.read_text().splitlines()) > rows):
        assert process.poll() is None, f"the run ended before {rows} rows of {csv_path.name}"
        assert time.monotonic() < deadline, f"no {rows} rows of {csv_path.name} in time"
        time.sleep(0.05)


def kill(process) -> None:
    """kill -9 a run that is still running, and every process it started (its workers, its
    fork server), which must end with it."""
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    assert process.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while survivors(process.marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert survivors(process.marker) == [], "processes of the killed run live on"


def assert_same_run(whole, resumed):
    """The same decoder, bit for bit, and the same loss and evaluation logs."""
    a = torch.load(whole / "model.pt", weights_only=True)["decoder"]
    b = torch.load(resumed / "model.pt", weights_only=True)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("losses.csv", "eval.csv"):
        assert read_rows(whole / name) == read_rows(resumed / name)


@pytest.fixture
def long_params(toy_params):
    def params(out):
        return toy_params(out, iters=30,
                          rfm_start=15, checkpoint_every=4, eval_every=10)
    return params


def test_sigterm_stops_training_with_a_checkpoint_and_a_rerun_ends_as_an_unbroken_run(
        run_stage, long_params, tmp_path):
    whole = run_stage("train", long_params(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0
    broken = run_stage("train", long_params(tmp_path / "broken"))
    wait_for_rows(broken, tmp_path / "broken" / "losses.csv", 6)
    broken.send_signal(signal.SIGTERM)
    assert broken.wait(timeout=30) != 0
    assert "stopped by a signal after iteration" in broken.stderr.read()
    stopped_at = torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=False)["iteration"]
    assert stopped_at == int(read_rows(tmp_path / "broken" / "losses.csv")[-1]["iteration"])
    assert run_stage("train", long_params(tmp_path / "broken")).wait(timeout=300) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "broken")


def test_training_killed_twice_resumes_to_the_same_model(run_stage, long_params, tmp_path):
    whole = run_stage("train", long_params(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0
    for rows in (5, 13):  # between checkpoints, once before and once after an evaluation
        process = run_stage("train", long_params(tmp_path / "killed"))
        wait_for_rows(process, tmp_path / "killed" / "losses.csv", rows)
        kill(process)
    assert run_stage("train", long_params(tmp_path / "killed")).wait(timeout=300) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_a_second_run_on_the_same_folder_is_refused(run_stage, long_params, tmp_path):
    from pipeline.stage import exclusive
    from pipeline.train import train

    first = run_stage("train", long_params(tmp_path / "run"))
    wait_for_rows(first, tmp_path / "run" / "losses.csv", 1)
    with pytest.raises(ValueError, match=r"run: another weclip run \(pid \d+\) is writing here"):
        train(long_params(tmp_path / "run"))
    kill(first)
    with exclusive(tmp_path / "run"):  # the lock died with its process
        pass


def add_images(root: Path, split: str, count: int) -> None:
    """``count`` more images of ``split`` in the toy dataset at ``root``: its images turned."""
    from weclip.contract import Record, read_classes, read_manifest, write_dataset

    records = read_manifest(root)
    sources = [r for r in records if r.split == split]
    for i in range(count):
        source = sources[i % len(sources)]
        turns = 1 + i // len(sources) % 3
        image_id = f"{split}-{i}"
        Image.open(source.image).rotate(90 * turns).save(root / f"{image_id}.png")
        mask = None
        if source.mask:
            mask = root / f"{image_id}_mask.png"
            Image.open(source.mask).rotate(90 * turns).save(mask)
        records.append(Record(image_id, root / f"{image_id}.png", mask, split, source.labels))
    write_dataset(root, read_classes(root), records)


def kill_at_random_points(start, progress, points, seed=0):
    """Start a run and kill -9 it once ``progress()`` reaches each of ``points``, plus a random
    delay of up to 20 ms; yields after each kill, for the caller to check what the run left."""
    draw = random.Random(seed)
    for point in points:
        process = start()
        while progress() < point:
            assert process.poll() is None, f"the run ended before {point} units of progress"
            time.sleep(0.001)
        time.sleep(draw.uniform(0, 0.02))
        kill(process)
        yield


def test_inference_killed_at_random_points_resumes_to_the_same_files(
        run_stage, long_params, toy_dataset, tmp_path):
    from weclip.images import load_mask

    add_images(toy_dataset / "prepared" / "toy", "val", 10)  # 12 val images
    params = long_params(tmp_path / "run")
    params.train.iters, params.infer.long_side, params.infer.workers = 1, 64, 1
    assert run_stage("train", params).wait(timeout=300) == 0

    def infer_params(out):
        params.infer.out = str(out)
        return pickle.loads(pickle.dumps(params))

    assert run_stage("infer", infer_params(tmp_path / "whole")).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    for _ in kill_at_random_points(lambda: run_stage("infer", infer_params(killed)),
                                   lambda: len(list(killed.glob("crf/*.png"))), (1, 4, 8)):
        for png in killed.rglob("*.png"):  # every file there is whole
            load_mask(png)
    assert run_stage("infer", infer_params(killed)).wait(timeout=300) == 0
    whole, resumed = files(tmp_path / "whole"), files(killed)
    assert {k: v for k, v in whole.items() if k != "fingerprint.txt"} == {
        k: v for k, v in resumed.items() if k != "fingerprint.txt"}


CACHE = """
from pipeline.cache import write_cache
from weclip.backbone import FrozenCLIP
from weclip.config import ModelConfig
backbone = FrozenCLIP.from_config(ModelConfig(sys.argv[2], sys.argv[3]))
write_cache(backbone, sys.argv[4], "train", sys.argv[5], size=64, batch_size=1, shard_size=2,
            progress=False)
"""


def test_cache_killed_at_random_points_resumes_to_the_same_store(
        run_python, toy_dataset, tiny_arch, tiny_clip_weights, tmp_path):
    root = toy_dataset / "prepared" / "toy"
    add_images(root, "train", 16)  # 22 train images: 11 shards of 2

    def cache(out):
        return run_python(CACHE, tiny_arch, tiny_clip_weights, root, out)

    assert cache(tmp_path / "whole.zarr").wait(timeout=300) == 0, "the uninterrupted run"
    whole = zarr.open_group(tmp_path / "whole.zarr")
    arrays = {name: whole[name][:] for name in ("images", "tokens", "attn", "labels")}
    killed = tmp_path / "killed.zarr"
    for _ in kill_at_random_points(lambda: cache(killed),
                                   lambda: len(list(killed.glob("done/c/*"))), (1, 4, 8)):
        # What the store says is done is whole and right: no torn write is ever counted.
        store = zarr.open_group(killed)
        done = store["done"][:]
        assert done.any() and not done.all()
        for name, expected in arrays.items():
            np.testing.assert_array_equal(store[name][:][done], expected[done])
    assert cache(killed).wait(timeout=300) == 0
    resumed = zarr.open_group(killed)
    for name, expected in arrays.items():
        np.testing.assert_array_equal(resumed[name][:], expected)
    assert resumed["done"][:].all() and dict(resumed.attrs) == dict(whole.attrs)


def dvc_project(folder: Path) -> Path:
    """A DVC project with this project's pipeline and code, on the world recipe made tiny."""
    folder.mkdir()
    for name in ("pipeline", "weclip"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", folder)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["world"].update(image_size=64, n_train=4, n_val=2)
    params["train"].update(iters=8, rfm_start=4, batch_size=2, crop_size=64, workers=0,
                           log_every=1, checkpoint_every=2, eval_every=4, eval_images=2)
    params["infer"].update(long_side=64, workers=1)
    params["upper_bound"]["enabled"] = False
    params["evaluate"].update(train_images=2, qualitative=1)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=folder, check=True)
    return folder


def test_a_dvc_repro_killed_during_training_ends_as_an_unbroken_one(prefect_server, tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_server, "OMP_NUM_THREADS": "1", "WECLIP_TEST_RUN": marker}

    def repro(project):
        with open(project / "repro.log", "a") as log:
            return subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def finished(process, project):
        assert process.wait(timeout=600) == 0, (project / "repro.log").read_text()[-3000:]

    whole = dvc_project(tmp_path / "whole")
    finished(repro(whole), whole)

    killed = dvc_project(tmp_path / "killed")
    process = repro(killed)
    wait_for_rows(process, killed / "runs" / "train" / "losses.csv", 3, timeout=600)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage it runs, as a lost job
    process.wait()
    time.sleep(1)
    assert survivors(marker) == [], "processes of the killed run live on"
    assert not (killed / "runs" / "train" / "model.pt").exists(), "killed during training"
    finished(repro(killed), killed)
    for name in ("reports/metrics.json", "runs/train/eval.csv", "runs/train/losses.csv"):
        assert (killed / name).read_text() == (whole / name).read_text(), name
