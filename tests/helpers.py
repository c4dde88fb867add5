"""Plain helpers of the tests (fixtures are in conftest.py)."""
import csv


def read_rows(path) -> list[dict]:
    """The rows of a CSV file as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def files(root) -> dict[str, bytes]:
    """Every file under ``root``: its path relative to ``root`` -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def survivors(marker: str) -> list[int]:
    """The processes whose environment holds WECLIP_TEST_RUN=``marker``: those a test run
    started (a stage, its server, its workers), however they were adopted since."""
    from pathlib import Path

    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"WECLIP_TEST_RUN={marker}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            pass
    return found


def interrupted_and_resumed(module, pretrain, world, out, every: int, monkeypatch, **settings):
    """A pretraining run of ``module``'s ``pretrain`` into ``out``, stopped right after its
    first checkpoint (at step ``every``) and run again: (the resumed call's result, the
    weights written)."""
    import pytest
    from safetensors.torch import load_file

    from pipeline.pretraining import WEIGHTS_FILE

    save = module.save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain(world, out, checkpoint_every=every, **settings)
    monkeypatch.undo()
    resumed = pretrain(world, out, checkpoint_every=every, **settings)
    return resumed, load_file(str(out / WEIGHTS_FILE))
