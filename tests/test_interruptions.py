"""Stopping a stage: a signal stops it cleanly with its progress saved, kill -9 loses only the
unfinished step, a rerun ends as an uninterrupted run, and two runs never share a folder."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from test_train import read_rows, toy_dataset, toy_params  # noqa: F401 (a fixture)

RUNNER = """
import pickle, sys
import open_clip
open_clip.add_model_config(sys.argv[1])
params = pickle.load(open(sys.argv[2], "rb"))
from pipeline import {stage} as module
module.{stage}(params)
"""


@pytest.fixture
def run_stage(tiny_arch, tmp_path):
    """Start a stage on params in a fresh process, as the CLI's ranks do (without Prefect)."""
    configs = tmp_path / "model_configs"
    configs.mkdir()
    (configs / f"{tiny_arch}.json").write_text(json.dumps(open_clip.get_model_config(tiny_arch)))

    def start(stage, params):
        path = tmp_path / f"params-{time.monotonic_ns()}.pkl"
        path.write_bytes(pickle.dumps(params))
        return subprocess.Popen([sys.executable, "-c", RUNNER.format(stage=stage), str(configs),
                                 str(path)], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    return start


def wait_for_rows(process, csv_path, rows, timeout=120):
    """Wait until ``csv_path`` has ``rows`` data rows (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)


def assert_same_run(whole, resumed):
    """The same decoder, bit for bit, and the same loss and evaluation logs."""
    a = torch.load(whole / "model.pt", weights_only=True)["decoder"]
    b = torch.load(resumed / "model.pt", weights_only=True)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("losses.csv", "eval.csv"):
        assert read_rows(whole / name) == read_rows(resumed / name)


@pytest.fixture
def long_params(toy_dataset, tiny_arch, tiny_clip_weights):
    def params(out):
        return toy_params(toy_dataset, tiny_arch, tiny_clip_weights, out, iters=30,
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
        process.kill()
        process.wait()
    assert run_stage("train", long_params(tmp_path / "killed")).wait(timeout=300) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_a_second_run_on_the_same_folder_is_refused(run_stage, long_params, tmp_path):
    from pipeline.common import exclusive
    from pipeline.train import train

    first = run_stage("train", long_params(tmp_path / "run"))
    wait_for_rows(first, tmp_path / "run" / "losses.csv", 1)
    with pytest.raises(ValueError, match=r"run: another weclip run \(pid \d+\) is writing here"):
        train(long_params(tmp_path / "run"))
    first.kill()
    first.wait()
    with exclusive(tmp_path / "run"):  # the lock died with its process
        pass


def test_inference_killed_mid_split_resumes_to_the_same_files(run_stage, long_params, tmp_path):
    from test_distributed import files

    params = long_params(tmp_path / "run")
    params.train.iters, params.infer.long_side, params.infer.workers = 1, 64, 1
    assert run_stage("train", params).wait(timeout=300) == 0

    def infer_params(out):
        params.infer.out = str(out)
        return pickle.loads(pickle.dumps(params))

    assert run_stage("infer", infer_params(tmp_path / "whole")).wait(timeout=300) == 0
    process = run_stage("infer", infer_params(tmp_path / "killed"))
    while process.poll() is None and not list((tmp_path / "killed").rglob("*.png")):
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert run_stage("infer", infer_params(tmp_path / "killed")).wait(timeout=300) == 0
    whole, killed = files(tmp_path / "whole"), files(tmp_path / "killed")
    assert {k: v for k, v in whole.items() if k != "fingerprint.txt"} == {
        k: v for k, v in killed.items() if k != "fingerprint.txt"}
