"""Monitoring is never on a stage's critical path: a Prefect server killed during train, cache or
infer, or unreachable from the start, changes nothing but the monitoring; reporting resumes when
the server is back; and a killed stage leaves no process behind (docs/running.md)."""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from helpers import read_rows, survivors

pytestmark = pytest.mark.slow

WORLD = {"dataset": "world", "world": {"image_size": 64, "n_pretrain": 0, "n_train": 8,
                                       "n_val": 6}}
MODEL = {"arch": "ViT-Tiny-8-128", "weights": None, "decoder_dim": 32, "par_iters": 2}
TRAIN = {"split": "train", "iters": 40, "rfm_start": 20, "batch_size": 2, "crop_size": 64,
         "workers": 0, "log_every": 1, "checkpoint_every": 10, "eval_every": 40,
         "eval_images": 2}


@pytest.fixture
def project(tmp_path):
    """A folder with a tiny world prepared and params.yaml; ``run(stage, api)`` starts
    `weclip <stage>` there reporting to ``api`` (None: a server of its own), marked so that
    ``survivors`` finds every process it started."""
    params = {"data": WORLD, "model": MODEL, "train": TRAIN, "cache": {"shard_size": 2},
              "infer": {"long_side": 64, "workers": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    marker = uuid.uuid4().hex

    def run(stage, api, *overrides):
        env = {**os.environ, "WECLIP_TEST_RUN": marker, "PREFECT_HOME": str(tmp_path / ".prefect")}
        env.pop("PREFECT_API_URL", None)
        if api:
            env["PREFECT_API_URL"] = api
        args = [a for o in overrides for a in ("-S", o)]
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", stage, *args],
                                   cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        # The console, read as it comes (a full pipe would stop the run).
        process.console = []
        process.reader = threading.Thread(target=lambda: process.console.extend(process.stderr))
        process.reader.start()
        return process

    prepare = run("prepare", "http://127.0.0.1:9/api")  # no server: prepare goes on anyway
    assert finish(prepare)
    run.folder, run.marker = tmp_path, marker
    return run


@pytest.fixture
def server(tmp_path, monkeypatch):
    """``start(port=None)``: a Prefect server on a database of its own, answering: (its API
    address, its process). Stopped at the end of the test."""
    from pipeline import prefect_env

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "server-home"))
    started = []

    def start(port=None):
        api, process = prefect_env.start_server(port)
        started.append(process)
        assert prefect_env.wait_for(api, process), "the test's Prefect server did not start"
        return api, process

    yield start
    for process in started:
        if process.poll() is None:
            prefect_env.stop(process)


def wait_until(process, ready, timeout=300):
    """Wait until ``ready()`` while ``process`` runs; fails if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended first: " + "".join(process.console[-20:])
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.1)


def finish(process) -> str:
    """Wait for the run; its exit code must be 0; returns its console output (stderr)."""
    process.wait(timeout=600)
    process.reader.join()
    console = "".join(process.console)
    assert process.returncode == 0, console[-3000:]
    assert "Traceback" not in console
    return console


def progress_of(project, stage):
    """A function saying how far ``stage`` has got, in its own units."""
    folder = project.folder
    if stage == "train":
        return lambda: len(read_rows(folder / "runs/train/losses.csv")) if (
            folder / "runs/train/losses.csv").exists() else 0
    if stage == "cache":
        return lambda: len(list((folder / "data/cache/train.zarr/tokens").rglob("c/*")))
    return lambda: len(list((folder / "runs/infer/crf").glob("*.png")))


def check_outputs(project, stage):
    folder = project.folder
    if stage == "train":
        assert [int(r["iteration"]) for r in read_rows(folder / "runs/train/losses.csv")] == list(
            range(1, 41))
        assert (folder / "runs/train/model.pt").exists()
    elif stage == "cache":
        import zarr

        assert zarr.open_group(folder / "data/cache/train.zarr")["done"][:].all()
    else:
        assert len(list((folder / "runs/infer/crf").glob("*.png"))) == WORLD["world"]["n_val"]


STAGES = {"train": (), "cache": ("train.features=cache",), "infer": ()}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_ends_as_usual_when_its_server_is_killed(project, server, stage):
    if stage == "infer":
        trained = project("train", "http://127.0.0.1:9/api", "train.iters=2", "train.rfm_start=1")
        assert trained.wait(timeout=300) == 0
    api, process = server()
    run = project(stage, api, *STAGES[stage])
    wait_until(run, lambda: progress_of(project, stage)() >= 1)
    os.kill(process.pid, signal.SIGKILL)
    console = finish(run)
    check_outputs(project, stage)
    warnings = [line for line in console.splitlines() if "does not answer" in line]
    assert len(warnings) == 1, console[-3000:]
    assert "the stage goes on" in warnings[0]


def test_a_stage_ends_as_usual_when_no_server_answers(project):
    console = finish(project("train", "http://127.0.0.1:9/api"))
    check_outputs(project, "train")
    assert sum("does not answer" in line for line in console.splitlines()) == 1


def test_reporting_resumes_when_the_server_comes_back(project, server):
    from prefect.client.orchestration import SyncPrefectClient

    api, process = server()
    port = int(api.rsplit(":", 1)[1].split("/")[0])
    run = project("train", api, "train.iters=1500", "train.checkpoint_every=100",
                  "train.log_every=10", "train.eval_every=1500")
    wait_until(run, lambda: progress_of(project, "train")() >= 2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    wait_until(run, lambda: any("does not answer" in line for line in run.console))
    server(port)  # the same database, the same address
    console = finish(run)
    assert "answers again; reporting resumed" in console
    with SyncPrefectClient(api) as client:
        (flow_run,) = client.read_flow_runs()
        tasks = client.read_task_runs()
    assert flow_run.state.type.value == "COMPLETED"
    assert "save model" in {t.name for t in tasks}


def test_a_killed_stage_leaves_no_process_behind(project):
    """Its own Prefect server, DataLoader workers and their fork server end with it."""
    run = project("train", None, "train.workers=2", "train.iters=1500")
    wait_until(run, lambda: progress_of(project, "train")() >= 2)
    assert len(survivors(project.marker)) >= 4  # the stage, its server, a fork server, workers
    run.kill()
    run.wait()
    deadline = time.monotonic() + 10
    while survivors(project.marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert survivors(project.marker) == []
