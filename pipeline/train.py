"""The train stage: WeCLIP's training loop with checkpoints, resume, loss log and evaluation.

Outputs under ``train.out``: ``checkpoint.pt`` (written atomically every ``checkpoint_every``
iterations; a rerun resumes from it), ``losses.csv`` (for `dvc plots`), ``eval.csv`` (periodic
pseudo-label mIoU on the train split and segmentation mIoU on the val split) and, at the end,
``model.pt`` (self-describing: ``weclip.load_model`` rebuilds the model from it alone).

Under torchrun (``train.nproc`` > 1 launches it) every rank runs this loop on its slice of each
global batch of ``train.batch_size`` images, the decoder wrapped in DistributedDataParallel;
rank 0 alone evaluates and writes. The upper-bound stage is the same loop on ground-truth masks.
"""
from __future__ import annotations

import csv
import shutil
from contextlib import ExitStack
from dataclasses import replace
from itertools import count
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from weclip import create_model, save_model
from weclip.dataset import Batch, EvalDataset, TrainDataset, read_classes
from weclip.files import write_atomically
from weclip.metrics import mean_iou
from weclip.optim import build_optimizer, poly_warmup
from weclip.training import TrainStep

from . import distributed
from .common import Stopped, exclusive, run_step, score, stop_requests
from .features import CachedFeatures
from .params import Params, params_fingerprint

LOSS_COLUMNS = ("iteration", "loss", "seg_loss", "aff_loss", "lr")
EVAL_COLUMNS = ("iteration", "train_pseudo_miou", "val_miou")


def _batches(data, batch_size: int, seed: int, start: int, workers: int, pin_memory: bool):
    """This rank's part of every global batch from iteration ``start`` on, forever.

    A global batch is ``batch_size`` indices of a seeded permutation per epoch (the last partial
    batch dropped), whatever the number of ranks, so a resumed or scaled-out run sees the same
    data; rank r takes the r-th of equal slices.
    """
    ranks, rank = distributed.world_size(), distributed.rank()
    per_rank = batch_size // ranks
    per_epoch = len(data) // batch_size
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in count(first_epoch):
        # Its own generator: the loader must not draw from the global RNG (dropout's), which
        # the checkpoint restores.
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(data), generator=generator)
        batches = order[:per_epoch * batch_size].view(per_epoch, ranks, per_rank)[skip:, rank]
        skip = 0
        data.epoch = epoch  # TrainDataset seeds its augmentation with it
        # Workers forked from a process running Prefect's threads die at start; forkserver
        # workers start from a clean process.
        context = "forkserver" if workers else None
        yield from torch.utils.data.DataLoader(
            data, batch_sampler=batches.tolist(), num_workers=workers, generator=generator,
            collate_fn=Batch.collate, pin_memory=pin_memory, multiprocessing_context=context)


def _trim_csv(path: Path, columns, keep_below: int) -> None:
    """Keep the header and rows of iterations below ``keep_below``: rows an interrupted run
    logged after its last checkpoint are redone on resume."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iteration"]) < keep_below]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _append_csv(path: Path, columns, row: dict) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, columns).writerow(row)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order."""
    if distributed.world_size() == 1:
        return [obj]
    out = [None] * distributed.world_size()
    dist.all_gather_object(out, obj)
    return out


def train(params: Params, on_log=None, on_eval=None, step=run_step) -> Path:
    """Train WeCLIP as ``params`` say; resume from ``train.out``/checkpoint.pt when present.

    ``on_log(iteration, losses and lr)`` and ``on_eval(iteration, mious)`` are called (on rank 0)
    after each logged iteration and each periodic evaluation; ``step`` runs rank 0's steps
    (building the model, each evaluation, each checkpoint, saving model.pt; see
    ``common.run_step``). Returns the path of model.pt.
    SIGTERM or SIGINT stop it at the next iteration (under torchrun: the next logged one, where
    the ranks agree) with a checkpoint written, raising ``Stopped``.
    """
    t = params.train
    device = distributed.local_device(t.device)
    distributed.init(device)
    out = Path(t.out)
    with ExitStack() as stack:
        if distributed.is_main():
            stack.enter_context(exclusive(out))
        stop = stack.enter_context(stop_requests())
        return _train(params, device, stop, on_log, on_eval, step)


def _train(params: Params, device: torch.device, stop, on_log, on_eval, step) -> Path:
    t = params.train
    ranks, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if t.batch_size % ranks:
        raise ValueError(f"train.batch_size: {t.batch_size} images do not split evenly over "
                         f"{ranks} processes")
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)  # the same initial decoder on every rank
    root = params.dataset_dir
    info = read_classes(root)
    model = step("build model", lambda: create_model(params.model, info).to(device))
    decoder = model.decoder
    optimizer = build_optimizer(model, t.lr, t.decoder_lr_mult, t.betas, t.weight_decay)
    scheduler = poly_warmup(optimizer, t.iters, t.warmup_iters, t.warmup_ratio, t.power)
    train_step = TrainStep(model, optimizer, scheduler, radius=t.radius,
                           affinity_weight=t.affinity_weight, ignore_index=info.ignore_index,
                           amp=t.amp, sum_counts=_sum_over_ranks if ranks > 1 else None,
                           ranks=ranks)

    checkpoint, start = out / "checkpoint.pt", 0
    fingerprint = params_fingerprint(params, ("data", "model", "train"))
    state = torch.load(checkpoint, map_location=device, weights_only=False) if checkpoint.exists() else None
    if state is not None and state.get("fingerprint") != fingerprint:
        if main:
            print(f"{checkpoint}: made with other parameters; starting afresh", flush=True)
        state = None
    torch.manual_seed(t.seed + rank)  # each rank its own dropout draws, the same every run
    if state is not None:
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"][rank])
        start = state["iteration"]
    if main:
        # Rows after the checkpoint are redone; an evaluation's row is written before the
        # checkpoint of its iteration, so none is lost either.
        for name, columns in (("losses.csv", LOSS_COLUMNS), ("eval.csv", EVAL_COLUMNS)):
            _trim_csv(out / name, columns, keep_below=start + 1)
    if ranks > 1:
        # The decoder has no buffers to sync, so rank 0's evaluation forwards stay local.
        model.decoder = DistributedDataParallel(
            decoder, device_ids=[device.index] if device.type == "cuda" else None)

    supervised = t.supervision == "masks"
    if t.supervision not in ("pseudo", "masks"):
        raise ValueError(f"train.supervision: {t.supervision!r} is neither 'pseudo' nor 'masks'")
    if t.features == "online":
        data = TrainDataset(root, t.split, t.crop_size, t.scale_range, t.seed, with_masks=supervised)
    elif t.features == "cache" and not supervised:
        data = CachedFeatures(params.cache.path, model.backbone)
    else:
        raise ValueError(f"train.features: {t.features!r} with supervision {t.supervision!r}: "
                         "use 'online' (the cache holds no masks) or 'cache' with pseudo labels")
    if len(data) < t.batch_size:
        raise ValueError(f"{root}: split {t.split!r} has {len(data)} images, fewer than a batch")
    batches = _batches(data, t.batch_size, t.seed, start, t.workers, device.type == "cuda")
    evals = {s: EvalDataset(root, s) for s in (t.split, t.val_split)}

    def evaluation(done: int) -> dict:
        """The row of eval.csv at iteration ``done``."""
        val_conf = score(model, evals[t.val_split], device, t.eval_images, pseudo=False)
        row = {"iteration": done, "val_miou": round(100 * mean_iou(val_conf["prediction"]), 2)}
        if not supervised:  # a model trained on masks makes no pseudo labels
            train_conf = score(model, evals[t.split], device, t.eval_images, prediction=False)
            row["train_pseudo_miou"] = round(100 * mean_iou(train_conf["pseudo"]), 2)
        return row

    def save_checkpoint(done: int) -> None:
        rng = _gather(torch.get_rng_state())
        if main:
            state = {"iteration": done, "decoder": decoder.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "torch_rng": rng, "fingerprint": fingerprint}
            write_atomically(checkpoint, lambda tmp: torch.save(state, tmp))

    bar = tqdm(range(start, t.iters), initial=start, total=t.iters, desc="train", unit="it",
               disable=not main)
    for it, batch in zip(bar, batches):
        result = train_step(batch.to(device), refinement="rfm" if it >= t.rfm_start else "static")
        done = it + 1
        logged = done % t.log_every == 0 or done == t.iters
        if logged:
            # The stop request rides along, so that all ranks stop at the same iteration.
            losses = torch.stack([result[k] for k in ("loss", "seg_loss", "aff_loss")]
                                 + [result["loss"].new_tensor(float(stop.is_set()))])
            if ranks > 1:
                losses = _sum_over_ranks(losses)  # the shares add up to the batch's losses
            *values, stopping = losses.tolist()
            row = {**dict(zip(("loss", "seg_loss", "aff_loss"), values)),
                   "lr": optimizer.param_groups[0]["lr"]}
            if main:
                _append_csv(out / "losses.csv", LOSS_COLUMNS, {"iteration": done, **row})
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if on_log:
                    on_log(done, row)
        else:
            stopping = ranks == 1 and stop.is_set()
        if done % t.eval_every == 0 or done == t.iters:
            if main:
                row = step("evaluate", lambda: evaluation(done), f"iteration {done}")
                _append_csv(out / "eval.csv", EVAL_COLUMNS, row)
                if on_eval:
                    on_eval(done, row)
            distributed.barrier()  # the other ranks wait for rank 0's evaluation
        if stopping or done % t.checkpoint_every == 0 or done == t.iters:
            step("checkpoint", lambda: save_checkpoint(done), f"iteration {done}")
        if stopping and done < t.iters:
            bar.close()
            raise Stopped(f"{out}: stopped by a signal after iteration {done} of {t.iters}, "
                          "checkpoint written; run again to resume")
    bar.close()
    model.decoder = decoder
    final = out / "model.pt"
    if main:
        step("save model", lambda: save_model(model, final))
    distributed.barrier()
    return final


def train_upper_bound(params: Params, on_log=None, on_eval=None, step=run_step) -> Path | None:
    """The upper-bound stage: the same decoder trained on ground-truth masks into
    ``upper_bound.out`` when ``upper_bound.enabled``; otherwise that folder holds only a note
    (DVC always has the stage) and None is returned."""
    out = Path(params.upper_bound.out)
    skipped = out / "SKIPPED"
    if not params.upper_bound.enabled:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        skipped.write_text("upper_bound.enabled is false: no fully supervised model\n")
        return None
    skipped.unlink(missing_ok=True)
    supervised = replace(params, train=replace(params.train, supervision="masks",
                                               features="online", out=str(out)))
    return train(supervised, on_log, on_eval, step)
