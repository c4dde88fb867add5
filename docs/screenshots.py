"""Screenshots of the Prefect UI during and after a short run of the pipeline, for the README.

    apt-get install chromium              # Debian's Chromium, driven headless
    .venv/bin/python docs/screenshots.py  # about 5 min on 2 CPU cores

It runs prepare, train, infer and evaluate of the embedded world (training shortened to 200
iterations) in a temporary folder, under a Prefect server of its own, and writes
docs/images/prefect-*.png: the train run while it goes (its task timeline and log lines, the
evaluation table so far), then the list of runs, the evaluate run and its per-class IoU table.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A short world run; the evaluations come often enough to be seen while training goes on.
OVERRIDES = {"train": {"iters": 200, "rfm_start": 100, "log_every": 5, "checkpoint_every": 50,
                       "eval_every": 50, "eval_images": 50},
             "upper_bound": {"enabled": False}, "evaluate": {"train_images": 50}}


def main() -> None:
    if not Path(CHROMIUM).exists():
        sys.exit(f"error: {CHROMIUM}: no Chromium here; `apt-get install chromium`")
    work = Path(tempfile.mkdtemp(prefix="weclip-screenshots-"))
    if "PREFECT_API_URL" not in os.environ:
        # Again, inside a Prefect server of its own on a fresh database (stopped at the end).
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"),
               "PREFECT_SERVER_API_PORT": str(port)}
        sys.exit(subprocess.run([sys.executable, "-m", "pipeline.prefect_env", "serve", "--",
                                 sys.executable, __file__, str(work)], env=env).returncode)
    run(Path(sys.argv[1]), os.environ["PREFECT_API_URL"].removesuffix("/api"))


def run(work: Path, ui: str) -> None:
    from pipeline.params import write_recipe

    params = yaml.safe_load(write_recipe("world", work / "params.yaml").read_text())
    for group, values in OVERRIDES.items():
        params[group].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    weclip = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*weclip, "prepare"], cwd=work, check=True)

    train = subprocess.Popen([*weclip, "train"], cwd=work)
    evaluations = work / "runs" / "train" / "eval.csv"
    while train.poll() is None and not (evaluations.exists()
                                        and len(evaluations.read_text().splitlines()) >= 3):
        time.sleep(1)
    shoot(f"{ui}/runs/flow-run/{latest_id('flow', 'train')}", "prefect-train-running.png")
    shoot(f"{ui}/artifacts/artifact/{latest_id('artifact', 'train-evaluation')}",
          "prefect-train-evaluation.png")
    if train.wait() != 0:
        sys.exit("error: the train stage failed")

    for stage in ("infer", "evaluate"):
        subprocess.run([*weclip, stage], cwd=work, check=True)
    shoot(f"{ui}/runs", "prefect-runs.png")
    shoot(f"{ui}/runs/flow-run/{latest_id('flow', 'evaluate')}", "prefect-evaluate.png")
    shoot(f"{ui}/artifacts/artifact/{latest_id('artifact', 'iou')}", "prefect-iou.png")
    shutil.rmtree(work)


def latest_id(kind: str, name: str) -> str:
    """The id of the latest run of the flow ``name`` (``kind`` 'flow') or of the latest version
    of the artifact ``name`` (``kind`` 'artifact')."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters, sorting

    with get_client(sync_client=True) as client:
        if kind == "flow":
            found = client.read_flow_runs(
                flow_filter=filters.FlowFilter(name=filters.FlowFilterName(any_=[name])),
                sort=sorting.FlowRunSort.START_TIME_DESC, limit=1)
        else:
            found = client.read_artifacts(
                artifact_filter=filters.ArtifactFilter(key=filters.ArtifactFilterKey(any_=[name])),
                sort=sorting.ArtifactSort.CREATED_DESC, limit=1)
    return str(found[0].id)


def shoot(url: str, name: str, size: str = "1600,1000") -> None:
    """A PNG of ``url`` after its scripts have had 20 s (virtual time) to fetch and draw."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        # The flags keep Chromium off the network it would otherwise try to reach at start.
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}",
                        "--virtual-time-budget=20000", f"--screenshot={IMAGES / name}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{IMAGES / name}: {url}", flush=True)


if __name__ == "__main__":
    main()
