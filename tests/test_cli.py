"""The `weclip` commands run each stage as a completed Prefect flow, on params.yaml, and report
what it did through the Prefect API: run names, tasks, log lines, artifacts, state messages."""
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app


@pytest.mark.slow
def test_stages_run_as_prefect_flows_that_report_what_they_did(prefect_server, tmp_path):
    """Each stage in its own process, as `dvc repro` runs them, reporting to one server; train
    as 2 processes (train.nproc), of which rank 0 alone reports."""
    params = {
        "data": {"dataset": "world", "world": {"image_size": 64, "n_pretrain": 0, "n_train": 4,
                                               "n_val": 2}},
        "model": {"arch": "ViT-Tiny-8-128", "weights": None, "decoder_dim": 32, "par_iters": 2},
        "train": {"split": "train", "iters": 2, "rfm_start": 1, "batch_size": 2, "crop_size": 64,
                  "workers": 0, "log_every": 1, "checkpoint_every": 1, "eval_every": 2,
                  "eval_images": 2, "nproc": 2},
        "infer": {"long_side": 64, "workers": 1},
        "evaluate": {"train_images": 2, "qualitative": 1},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    for stage in ("prepare", "cache", "train", "infer", "evaluate"):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--tag", "test"],
                                cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (stage, result.stdout[-2000:], result.stderr[-2000:])
    # The reported final mIoU is that of the CRF predictions against the val masks.
    from weclip.contract import read_classes, read_manifest
    from weclip.images import load_mask
    from weclip.metrics import confusion_matrix, mean_iou

    root = tmp_path / "data" / "prepared" / "world"
    classes = read_classes(root).num_classes
    confusion = sum(confusion_matrix(load_mask(tmp_path / "runs/infer/crf" / f"{r.image_id}.png"),
                                     load_mask(r.mask), classes)
                    for r in read_manifest(root, "val"))
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["val"]["miou"] == round(100 * mean_iou(confusion), 2)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                FlowRunFilter, FlowRunFilterId, LogFilter,
                                                LogFilterFlowRunId)

    with get_client(sync_client=True) as client:
        runs = {client.read_flow(r.flow_id).name: r
                for r in client.read_flow_runs() if "test" in r.tags}
        logs = {stage: [log.message for log in client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
                for stage, run in runs.items()}
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[runs["train"].id])))}
        tasks = {stage: client.read_task_runs(flow_run_filter=FlowRunFilter(
                     id=FlowRunFilterId(any_=[run.id])))
                 for stage, run in runs.items()}
    assert {s: r.state.type.value for s, r in runs.items()} == {
        s: "COMPLETED" for s in ("prepare", "cache", "train", "infer", "evaluate")}
    assert {s: set(r.tags) for s, r in runs.items()} == {s: {f"stage:{s}", "test"} for s in runs}

    # Each stage's steps are its tasks, in the order they ran.
    assert {s: {t.state.type.value for t in ts} for s, ts in tasks.items() if ts} == {
        s: {"COMPLETED"} for s in ("train", "infer", "evaluate")}
    steps = {s: [t.name for t in sorted(ts, key=lambda t: t.start_time)] for s, ts in tasks.items()}
    assert steps["prepare"] == steps["cache"] == []
    assert steps["train"] == ["build model", "checkpoint · iteration 1", "evaluate · iteration 2",
                              "checkpoint · iteration 2", "save model"]
    val_ids = sorted(p.stem for p in (tmp_path / "runs" / "infer" / "crf").glob("*.png"))
    assert steps["infer"] == [f"segment · {val_ids[0]} to {val_ids[1]}", "export pseudo labels"]
    assert steps["evaluate"] == ["score CAM steps · split train", "score predictions · split val",
                                 "attention diagnostics", "write reports"]

    # Named by what ran: the stage, the dataset, and (outside a DVC experiment) a digest of
    # the parameters, the same for every stage of one pipeline run.
    names = {s: r.name.split(" · ") for s, r in runs.items()}
    assert {s: n[:2] for s, n in names.items()} == {s: [s, "world"] for s in runs}
    assert len({n[2] for n in names.values()}) == 1

    # Training reports its losses, speed and evaluations while it runs.
    assert any(re.fullmatch(r"iteration 1/2: loss [\d.]+ \(seg [\d.]+, aff [\d.]+\), lr \S+", m)
               for m in logs["train"])
    assert any(re.fullmatch(r"iteration 2/2: loss .*, lr \S+, [\d.]+ it/s, ETA 0:00:00", m)
               for m in logs["train"])
    assert any(re.fullmatch(r"iteration 2: val mIoU [\d.]+, train pseudo-label mIoU [\d.]+", m)
               for m in logs["train"])
    assert artifacts["train-progress"].data == 100.0
    table = json.loads(artifacts["train-evaluation"].data)
    assert [row["iteration"] for row in table] == [2] and "val_miou" in table[0]

    # The other stages say what they did, or that they did nothing.
    assert runs["cache"].state.message == ("nothing done: train.features is 'online': no "
                                           "feature cache is needed")
    assert any(m.startswith("2 images of split val segmented in runs/infer") for m in logs["infer"])
    assert any(re.match(r"val mIoU [\d.]+ .*, train pseudo-label mIoU [\d.]+; reports in reports",
                        m) for m in logs["evaluate"])


@pytest.mark.slow
def test_one_server_serves_a_whole_command_and_stops_after_it(tmp_path):
    """What `make repro` runs: `dvc repro` under one Prefect server on .prefect/."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), PREFECT_SERVER_API_PORT=str(port))
    api = f"http://127.0.0.1:{port}/api"
    answers = f"import urllib.request; print(urllib.request.urlopen('{api}/health').read())"
    result = subprocess.run([sys.executable, "-m", "pipeline.prefect_env", "serve", "--",
                             sys.executable, "-c", "import os; print(os.environ['PREFECT_API_URL']);"
                             + answers], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"Prefect UI at http://127.0.0.1:{port} (runs on "
                                          f"{tmp_path / '.prefect'})", api, "b'true'"]
    assert (tmp_path / ".prefect" / "prefect.db").exists()
    with pytest.raises(OSError):  # stopped
        urllib.request.urlopen(f"{api}/health", timeout=2)


@pytest.mark.slow
def test_the_server_of_a_killed_serve_ends_with_it(tmp_path):
    import signal
    import time
    import uuid

    from helpers import survivors

    marker = uuid.uuid4().hex
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), PREFECT_SERVER_API_PORT=str(port),
               WECLIP_TEST_RUN=marker)
    serve = subprocess.Popen([sys.executable, "-m", "pipeline.prefect_env", "serve", "--",
                              sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert serve.stdout.readline().startswith("Prefect UI at")  # the server answers
    deadline = time.monotonic() + 30
    while len(survivors(marker)) < 3 and time.monotonic() < deadline:  # the command runs
        time.sleep(0.2)
    serve.kill()
    serve.wait()
    deadline = time.monotonic() + 10
    while len(survivors(marker)) > 1 and time.monotonic() < deadline:  # the command lives on
        time.sleep(0.2)
    (command,) = survivors(marker)
    os.kill(command, signal.SIGKILL)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)


@pytest.mark.slow
def test_a_failed_stage_ends_in_one_line_and_is_recorded_as_a_failed_run(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    (tmp_path / "params.yaml").write_text("{}\n")  # nothing trained or prepared here
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "infer", "--tag", "failing"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr  # Prefect's, shown with --verbose only
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if "failing" in r.tags]
    assert [r.state.type.value for r in runs] == ["FAILED"]


def test_an_unknown_key_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    result = CliRunner().invoke(app, ["train", "-S", "train.iterations=3"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        "error: params.yaml.train: unknown key(s) iterations; known: split, ")


def test_a_recipe_is_written_in_full(tmp_path):
    result = CliRunner().invoke(app, ["recipe", "coco", "--out", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert written["data"]["dataset"] == "coco" and written["train"]["iters"] == 80000
    assert written["model"]["arch"] == "ViT-B-16-quickgelu"  # a default, written out


def test_pretrain_clip_draws_its_world_afresh_rather_than_reuse_a_stale_one(tmp_path):
    from pipeline.datasets.world import generate_world

    work, out = tmp_path / "work", tmp_path / "clip.safetensors"
    generate_world(work / "world", seed=1, n_pretrain=16, n_train=0, n_val=4)  # another seed's
    result = CliRunner().invoke(app, ["pretrain-clip", "--out", str(out), "--work", str(work),
                                      "--seed", "0", "--n-pretrain", "16", "--n-val", "4",
                                      "--steps", "1", "--batch-size", "16", "--threads", "1"])
    assert result.exit_code == 0, result.output
    expected = generate_world(tmp_path / "expected", seed=0, n_pretrain=16, n_train=0, n_val=4)
    assert (work / "world" / "captions.csv").read_text() == (expected / "captions.csv").read_text()
    assert out.stat().st_size > 0


def test_pretrain_dino_writes_weights_the_world_plus_recipe_can_load(tmp_path):
    from weclip.dino import create_dino
    from weclip.model_configs import TINY_DINO

    out = tmp_path / "dino.safetensors"
    result = CliRunner().invoke(app, ["pretrain-dino", "--out", str(out), "--work", str(tmp_path / "work"),
                                      "--n-pretrain", "8", "--n-val", "4", "--steps", "1",
                                      "--batch-size", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "patch k-NN purity" in result.output
    create_dino(TINY_DINO, str(out))  # strict: every key present, none extra
