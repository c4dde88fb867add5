"""Several ranks share the work as torchrun starts them, and leave what one process would."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import distributed
from pipeline.cache import write_cache
from helpers import files, read_rows
from weclip import FrozenCLIP
from weclip.config import ModelConfig


def _as_rank(rank, world, port, fn, *args):
    """Run ``fn(*args)`` as rank ``rank`` of ``world``, with the environment torchrun gives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    # One thread each: the ranks share the cores, and every process then computes the same
    # bits as any other (a thread count can change the order of a float sum).
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world, fn, *args):
    """Run ``fn(*args)`` in ``world`` fresh processes joined by Gloo (one: no process group).

    ``fn`` must be a module-level function: spawn pickles it by name.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_as_rank, args=(world, port, fn, *args), nprocs=world)


def _write_cache(configs, weights, dataset, out):
    """The cache stage as one rank runs it (5 images: 3 shards of 2); leaves beside ``out`` a
    record of what this rank computed."""
    distributed.init(torch.device("cpu"))  # as a stage would: the group is up, nothing happens
    open_clip.add_model_config(configs)  # a spawned process starts without the test's registry
    backbone = FrozenCLIP.from_config(ModelConfig("WeCLIP-Test-Tiny", str(weights)))
    seen, forward = [], backbone.forward

    def counted(images):
        seen.append(len(images))
        return forward(images)

    backbone.forward = counted
    write_cache(backbone, dataset, "train", out, size=64, batch_size=2, shard_size=2,
                progress=False)
    Path(f"{out}.rank{distributed.rank()}.json").write_text(json.dumps(
        {"rank": distributed.rank(), "world": distributed.world_size(), "images": sum(seen)}))


def computed(out):
    """What each rank of the last write to ``out`` computed."""
    return [json.loads(p.read_text()) for p in sorted(out.parent.glob(f"{out.name}.rank*.json"))]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_all_items_once_in_order(world):
    items = list("abcdefg")
    shards = [distributed.shard(items, rank, world) for rank in range(world)]
    assert sorted(sum(shards, [])) == items
    for shard in shards:
        assert shard == sorted(shard)
        assert len(shard) in (len(items) // world, len(items) // world + 1)


def test_one_process_is_rank_0_of_1():
    distributed.init(torch.device("cpu"))
    assert not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    distributed.barrier()


def test_local_device_is_this_ranks_gpu_under_the_launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not distributed.under_launcher()
    assert distributed.local_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.local_device("auto") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.under_launcher()
    assert distributed.local_device("auto") == torch.device("cuda", 1)
    assert distributed.local_device("cuda") == torch.device("cuda", 1)
    assert distributed.local_device("cuda:0") == torch.device("cuda", 0)
    assert distributed.local_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_launch_starts_nproc_processes_and_returns_the_failed_ones(tmp_path):
    # Each process: python -m <a module of tmp_path> that writes its rank, and rank 1 fails.
    (tmp_path / "ranked.py").write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(os.environ['WORLD_SIZE'])\n"
        "sys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    code = ("from pipeline.distributed import launch; "
            f"print(launch(2, ['ranked', {str(tmp_path / 'out')!r}]))")
    (tmp_path / "out").mkdir()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.stdout.strip() == "{1: 3}", result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0", "1"]
    assert (tmp_path / "out" / "0").read_text() == "2"
    assert "ChildFailedError" not in result.stderr  # the caller reports the failure


@pytest.fixture
def cache_args(photos, tiny_arch_configs, tiny_clip_weights):
    """``_write_cache``'s arguments but the store: the tiny CLIP's config folder and weights,
    and the dataset."""
    return tiny_arch_configs, tiny_clip_weights, photos


@pytest.mark.slow
def test_two_ranks_write_the_same_cache_as_one_and_resume_it(cache_args, tmp_path):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    run_ranks(1, _write_cache, *cache_args, one)
    run_ranks(2, _write_cache, *cache_args, two)
    assert len([f for f in files(one) if f.startswith("tokens/c/")]) == 3
    assert files(two) == files(one)
    # Rank 0 computed shards 0 and 2 (3 images), rank 1 shard 1 (2 images): none twice.
    assert computed(one) == [{"rank": 0, "world": 1, "images": 5}]
    assert computed(two) == [{"rank": 0, "world": 2, "images": 3},
                             {"rank": 1, "world": 2, "images": 2}]

    # As if interrupted: shard 1 (rank 1's) not marked done, shard 2 (rank 0's) not written.
    for name in ("done/c/1", "done/c/2", "tokens/c/2/0/0/0", "attn/c/2/0/0/0"):
        (two / name).unlink()
    run_ranks(2, _write_cache, *cache_args, two)
    assert files(two) == files(one)
    assert computed(two) == [{"rank": 0, "world": 2, "images": 1},  # shard 2 only
                             {"rank": 1, "world": 2, "images": 2}]


def _train(configs, params, record, interrupt_at=None, dino_configs=None):
    """The train stage as one rank runs it; leaves in ``record``.rank<r>.json every file this
    rank wrote. With ``interrupt_at``, rank 0 dies after logging that iteration.
    ``dino_configs``: the test's DINOv2 configs, which a spawned process starts without."""
    from pipeline import train as stage
    from weclip.model_configs import DINO_CONFIGS

    open_clip.add_model_config(configs)
    DINO_CONFIGS.update(dino_configs or {})
    written = []
    for name in ("write_atomically", "save_model", "_append_csv", "_trim_csv"):
        def recording(*args, _original=getattr(stage, name), **kwargs):
            path = next(a for a in args if isinstance(a, (str, Path)))
            written.append(str(path))
            return _original(*args, **kwargs)
        setattr(stage, name, recording)

    def on_log(iteration, row):
        if iteration == interrupt_at:
            raise KeyboardInterrupt

    try:
        stage.train(params, on_log=on_log)
    finally:
        Path(f"{record}.rank{distributed.rank()}.json").write_text(json.dumps(written))


def _infer(configs, params):
    from pipeline.infer import infer

    open_clip.add_model_config(configs)
    infer(params)


@pytest.fixture
def train_setup(toy_params, tiny_arch_configs):
    """A function of the run folder giving the toy training's params (global batch 4, no
    dropout: the one random draw a rank makes on its own), and the tiny CLIP's config folder."""

    def params(out, **train):
        p = toy_params(out, batch_size=4,
                       eval_every=100, **train)
        p.model.dropout = 0.0
        return p

    return params, tiny_arch_configs


def decoder_of(run):
    return torch.load(run / "model.pt", weights_only=True)["decoder"]


def losses_of(run):
    return [{k: float(v) for k, v in row.items()} for row in read_rows(run / "losses.csv")]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["weclip", "weclip+"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(train_setup, tmp_path, model,
                                                                  request):
    params, configs = train_setup
    dino_configs = {}
    if model == "weclip+":  # with the Dice loss over both ranks' pixels and self-training
        from weclip.model_configs import DINO_CONFIGS

        plus = request.getfixturevalue("plus_params")

        def params(out):
            p = plus(out, batch_size=4, eval_every=100)
            p.model.dropout = 0.0
            return p

        arch = request.getfixturevalue("tiny_dino_arch")
        dino_configs = {arch: DINO_CONFIGS[arch]}
    run_ranks(1, _train, configs, params(tmp_path / "one"), tmp_path / "one", None, dino_configs)
    run_ranks(2, _train, configs, params(tmp_path / "two"), tmp_path / "two", None, dino_configs)
    # The same sums in another order: float rounding, which Adam's first steps (update about
    # lr x sign of the gradient) can turn into up to 2 x lr = 4e-3 on a weight near zero gradient.
    for a, b in zip(losses_of(tmp_path / "one"), losses_of(tmp_path / "two"), strict=True):
        assert a["iteration"] == b["iteration"]
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, a["loss"])
    one, two = decoder_of(tmp_path / "one"), decoder_of(tmp_path / "two")
    assert all(torch.allclose(one[k], two[k], atol=4e-3) for k in one)
    assert sum((one[k] - two[k]).abs().sum() for k in one) / sum(v.numel() for v in one.values()) < 1e-5
    # Rank 0 alone writes the run's files.
    assert json.loads((tmp_path / "two.rank1.json").read_text()) == []
    assert {Path(p).name for p in json.loads((tmp_path / "two.rank0.json").read_text())} == {
        "checkpoint.pt", "losses.csv", "eval.csv", "model.pt"}


@pytest.mark.slow
def test_an_interrupted_two_rank_run_resumes_and_ends_as_the_uninterrupted_one(
        train_setup, tmp_path):
    params, configs = train_setup
    whole, broken = params(tmp_path / "whole"), params(tmp_path / "broken")
    run_ranks(2, _train, configs, whole, tmp_path / "whole")
    with pytest.raises(mp.ProcessRaisedException):  # rank 0's interrupt, or rank 1 losing it
        run_ranks(2, _train, configs, broken, tmp_path / "broken", 5)
    assert not (tmp_path / "broken" / "model.pt").exists()
    run_ranks(2, _train, configs, broken, tmp_path / "broken")
    a, b = decoder_of(tmp_path / "whole"), decoder_of(tmp_path / "broken")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_rows(tmp_path / "whole" / "losses.csv") == read_rows(tmp_path / "broken" / "losses.csv")


@pytest.mark.slow
def test_two_ranks_segment_the_same_files_as_one(train_setup, tmp_path):
    params, configs = train_setup
    trained = params(tmp_path / "run", iters=1)
    run_ranks(1, _train, configs, trained, tmp_path / "run")
    outs = {}
    for world in (1, 2):
        p = params(tmp_path / "run", iters=1)
        p.infer.out, p.infer.long_side, p.infer.workers = str(tmp_path / f"infer{world}"), 64, 1
        run_ranks(world, _infer, configs, p)
        outs[world] = {k: v for k, v in files(tmp_path / f"infer{world}").items()
                       if k != "fingerprint.txt"}  # it names the output folder
    assert len(outs[1]) == 3 * 2 + 6  # three variants of 2 val images, 6 pseudo labels
    assert outs[2] == outs[1]
