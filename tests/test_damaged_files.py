"""Files a stage reads back to resume, damaged or foreign (copied or cut short outside this
program): each is named in one error line that says what to do, and nothing else is touched;
and a write that fails for lack of space loses nothing (docs/running.md)."""
import dataclasses
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from helpers import files
from pipeline.cache import write_cache
from pipeline.infer import infer
from pipeline.train import train
from weclip.backbone import FrozenCLIP
from weclip.files import NoSpaceError, write_atomically


def test_a_damaged_checkpoint_is_named_and_left_alone(toy_params, tmp_path):
    params = toy_params(tmp_path / "run", iters=2)
    train(params)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short
    before = files(tmp_path / "run")
    params.train.iters = 4
    with pytest.raises(ValueError, match=f"^{checkpoint}: not a readable checkpoint .*; "
                                         "delete it to start afresh$"):
        train(params)
    assert files(tmp_path / "run") == before


def test_a_foreign_checkpoint_is_named(toy_params, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"iteration": 2, "decoder": {}}, checkpoint)  # an older version's
    with pytest.raises(ValueError, match=f"^{checkpoint}: not a checkpoint of format "):
        train(toy_params(tmp_path / "run"))


def test_a_damaged_loss_log_is_named(toy_params, tmp_path):
    params = toy_params(tmp_path / "run", iters=2)
    train(params)
    losses = tmp_path / "run" / "losses.csv"
    losses.write_text("iteration,loss\nnot a number,1\n")
    params.train.iters = 4
    with pytest.raises(ValueError, match=f"^{losses}: not a table of this run's iterations"):
        train(params)


def test_a_damaged_feature_cache_is_named(photos, tiny_model, tmp_path):
    store = write_cache(tiny_model.backbone, photos, "train", tmp_path / "cache.zarr", size=64,
                        progress=False)
    (store / "zarr.json").write_text("{ not json")
    with pytest.raises(ValueError, match=f"^{store}: not a readable feature cache .*; delete it "
                                         "to write it again$"):
        write_cache(tiny_model.backbone, photos, "train", store, size=64, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["crf", "single"])
def test_a_damaged_prediction_is_named_and_the_others_kept(toy_params, tmp_path, variant):
    params = toy_params(tmp_path / "run", iters=1)
    params.infer.long_side, params.infer.workers, params.infer.out = 64, 1, str(tmp_path / "infer")
    train(params)
    out = infer(params)
    damaged = sorted((out / variant).glob("*.png"))[0]
    damaged.write_bytes(damaged.read_bytes()[:20])
    before = files(out)
    with pytest.raises(ValueError, match=f"^{damaged}: a damaged output of an earlier run "
                                         r"\(\w+\); delete it to make it again$"):
        infer(params)
    assert files(out) == before


def test_a_damaged_file_ends_the_command_in_one_line(toy_params, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = toy_params(tmp_path / "run", iters=2)
    train(params)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    params.train.iters = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dataclasses.asdict(params)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no monitoring needed
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'run' / 'checkpoint.pt'}: not a readable checkpoint "
        "(UnpicklingError); delete it to start afresh")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- a full disk


def full_disk_on_write(monkeypatch, after: int = 100):
    """Path.write_bytes writes ``after`` bytes, then fails as a full disk does."""
    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data[:after]))
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_failed_write_keeps_the_previous_file_and_says_what_it_needs(tmp_path, monkeypatch):
    path = write_atomically(tmp_path / "checkpoint.pt", b"the previous checkpoint")
    full_disk_on_write(monkeypatch)
    with pytest.raises(NoSpaceError, match=f"^{path}: no space left on its device \\(2.0 MB "
                                           r"needed, [\d.]+ [kMG]B free\); free some space"):
        write_atomically(path, bytes(2 * 2**20))
    assert path.read_bytes() == b"the previous checkpoint"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB file system at tmp_path/disk (tmpfs; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` but ``leave`` bytes; returns the filler, to delete to free the space."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    filler.write_bytes(bytes(max(0, free - leave)))
    return filler


def test_a_full_disk_at_a_checkpoint_loses_nothing_and_a_rerun_resumes(
        toy_params, small_disk, tmp_path):
    whole = toy_params(tmp_path / "whole", iters=6, eval_every=4)
    train(whole)

    def fill_at_4(iteration, row):  # after the checkpoint of iteration 2, before that of 4
        if iteration == 4:
            fill(small_disk, leave=4096)

    run = toy_params(small_disk / "run", iters=6, eval_every=4)
    with pytest.raises(NoSpaceError, match=f"^{small_disk / 'run' / 'checkpoint.pt'}: no space"):
        train(run, on_eval=fill_at_4)
    assert torch.load(small_disk / "run" / "checkpoint.pt")["iteration"] == 2
    assert not (small_disk / "run" / "checkpoint.pt.tmp").exists()
    (small_disk / "filler").unlink()
    train(run)
    a = torch.load(tmp_path / "whole" / "model.pt")["decoder"]
    b = torch.load(small_disk / "run" / "model.pt")["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_at_a_cache_shard_loses_nothing_and_a_rerun_resumes(
        photos, tiny_config, small_disk):
    backbone = FrozenCLIP.from_config(tiny_config)
    store = small_disk / "cache.zarr"
    shards = []

    def fill_after_one(name, fn, detail=""):
        if shards:
            fill(small_disk, leave=4096)
        shards.append(fn())

    with pytest.raises(NoSpaceError, match=f"^{store}: no space left on its device \\(up to "):
        write_cache(backbone, photos, "train", store, size=64, shard_size=2, progress=False,
                    step=fill_after_one)
    import zarr

    assert zarr.open_group(store)["done"][:].tolist() == [True, True, False, False, False]
    (small_disk / "filler").unlink()
    write_cache(backbone, photos, "train", store, size=64, shard_size=2, progress=False)
    assert zarr.open_group(store)["done"][:].all()


def test_a_full_disk_at_a_report_keeps_the_previous_report(small_disk):
    from pipeline.report import write_metrics

    path = write_metrics({"val": {"miou": 50.0}}, small_disk / "metrics.json")
    fill(small_disk, leave=0)
    with pytest.raises(NoSpaceError, match=f"^{path}: no space left on its device"):
        write_metrics({"val": {"miou": 60.0}, "ablation": {f"step {i}": i for i in range(999)}},
                      path)
    assert "50.0" in path.read_text()
    assert not path.with_name(path.name + ".tmp").exists()
