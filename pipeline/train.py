"""The train stage: WeCLIP's training loop with checkpoints, resume, loss log and evaluation.

Outputs under ``train.out``: ``checkpoint.pt`` (written atomically every ``checkpoint_every``
iterations; a rerun resumes from it, on any device), ``losses.csv`` (for `dvc plots`),
``eval.csv`` (periodic pseudo-label mIoU on the train split and segmentation mIoU on the val
split) and, at the end, ``model.pt`` (self-describing: ``weclip.load_model`` rebuilds the model
from it alone).

Under torchrun (``train.nproc`` > 1 launches it) every rank runs this loop on its slice of each
global batch of ``train.batch_size`` images, the decoder wrapped in DistributedDataParallel;
rank 0 alone evaluates and writes. The upper-bound stage is the same loop on ground-truth masks.
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from functools import partial
from itertools import count
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from weclip.batch import Batch
from weclip.contract import read_classes
from weclip.dataset import EvalDataset, TrainDataset, epoch_order
from weclip.factory import create_model, save_model
from weclip.files import torch_bytes, write_atomically
from weclip.metrics import mean_iou
from weclip.optim import build_optimizer, poly_warmup
from weclip.training import TrainStep

from . import distributed
from .features import CachedFeatures
from .orphans import die_with_parent, forkserver
from .params import Params, params_fingerprint
from .scoring import score
from .stage import Run, Stopped, discard_stale, run_step, stage

LOSS_COLUMNS = ("iteration", "loss", "seg_loss", "aff_loss", "lr")
EVAL_COLUMNS = ("iteration", "train_pseudo_miou", "val_miou")
CHECKPOINT_FORMAT = "weclip-checkpoint/2"


def train(params: Params, on_log=None, on_eval=None, step=run_step) -> Path:
    """Train WeCLIP as ``params`` say; resume from ``train.out``/checkpoint.pt when present.

    ``on_log(iteration, losses and lr)`` and ``on_eval(iteration, mious)`` are called (on rank 0)
    after each logged iteration and each periodic evaluation; ``step`` runs rank 0's steps
    (building the model, each evaluation, each checkpoint, saving model.pt; see
    ``stage.run_step``). Returns the path of model.pt.
    SIGTERM or SIGINT stop it at the next iteration (under torchrun: the next logged one, where
    the ranks agree) with a checkpoint written, raising ``Stopped``.
    """
    with stage(Path(params.train.out), params.train.device) as run:
        training = Training(params, run, step)
        training.resume()
        training.loop(on_log, on_eval)
        return training.finish()


class Training:
    """A training run: built from the params, resumed from its checkpoint, its loop, its model
    file."""

    def __init__(self, params: Params, run: Run, step=run_step):
        t = self.t = params.train
        self.params, self.run, self.step = params, run, step
        self.ranks, self.rank, self.main = (distributed.world_size(), distributed.rank(),
                                            distributed.is_main())
        self.out = Path(t.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.out / "checkpoint.pt"
        self.fingerprint = params_fingerprint(params, ("data", "model", "train"))
        self.start = 0

        root = params.dataset_dir
        info = read_classes(root)
        torch.manual_seed(t.seed)  # the same initial decoder on every rank
        self.model = step("build model", lambda: create_model(params.model, info).to(run.device))
        self.decoder = self.model.decoder
        self.optimizer = build_optimizer(self.model, t.lr, t.decoder_lr_mult, t.betas,
                                         t.weight_decay)
        self.scheduler = poly_warmup(self.optimizer, t.iters, t.warmup_iters, t.warmup_ratio,
                                     t.power)
        self.train_step = TrainStep(
            self.model, self.optimizer, self.scheduler, radius=t.radius,
            affinity_weight=t.affinity_weight, dice_weight=t.dice_weight,
            cross_weight=t.cross_weight, confidence=t.self_training_confidence,
            ignore_index=info.ignore_index, amp=t.amp,
            sum_counts=_sum_over_ranks if self.ranks > 1 else None, ranks=self.ranks)

        self.supervised = t.supervision == "masks"
        if t.features == "cache":
            self.data = CachedFeatures(params.cache.path, self.model.backbone)
        else:
            self.data = TrainDataset(root, t.split, t.crop_size, t.scale_range, t.seed,
                                     with_masks=self.supervised)
        if len(self.data) < t.batch_size:
            raise ValueError(f"{root}: split {t.split!r} has {len(self.data)} images, fewer "
                             "than a batch")
        if t.max_labels is not None and t.max_labels < self.data.most_labels:
            raise ValueError(f"train.max_labels: {t.max_labels} is fewer than the "
                             f"{self.data.most_labels} class labels of an image of split {t.split!r}")
        self.slots = t.max_labels or self.data.most_labels
        self.evals = {s: EvalDataset(root, s) for s in (t.split, t.val_split)}

    def resume(self) -> None:
        """Continue from the checkpoint when there is one of these settings: decoder, optimiser,
        schedule and every random generator as they were, so that the run goes on as the
        unbroken one would; then wrap the decoder for data-parallel training."""
        state = read_checkpoint(self.checkpoint) if self.checkpoint.exists() else None
        if state is not None and state["fingerprint"] != self.fingerprint:
            state = None
            distributed.barrier()  # every rank has read it
            if self.main:
                discard_stale(self.checkpoint, "checkpoint")
        torch.manual_seed(self.t.seed + self.rank)  # each rank its own dropout draws (CUDA too)
        if state is not None:
            self.decoder.load_state_dict(state["decoder"])
            self.optimizer.load_state_dict(state["optimizer"])  # onto the parameters' device
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng(state["rng"], self.rank, self.run.device)
            self.start = state["iteration"]
        if self.main:
            # Rows after the checkpoint are redone; an evaluation's row is written before the
            # checkpoint of its iteration, so none is lost either.
            for name, columns in (("losses.csv", LOSS_COLUMNS), ("eval.csv", EVAL_COLUMNS)):
                _trim_csv(self.out / name, columns, keep_below=self.start + 1)
        if self.ranks > 1:
            # The decoder has no buffers to sync, so rank 0's evaluation forwards stay local.
            device = self.run.device
            self.model.decoder = DistributedDataParallel(
                self.decoder, device_ids=[device.index] if device.type == "cuda" else None)
        if self.t.compile:
            self.model.compile_parts()

    def loop(self, on_log=None, on_eval=None) -> None:
        """Train from the start iteration to ``train.iters``: log, evaluate and checkpoint as
        the params say; stop at a signal with a checkpoint written."""
        t, device = self.t, self.run.device
        batches = _batches(self.data, t.batch_size, t.seed, self.start, t.workers,
                           pin_memory=device.type == "cuda", slots=self.slots)
        bar = tqdm(range(self.start, t.iters), initial=self.start, total=t.iters, desc="train",
                   unit="it", disable=not self.main)
        for it, batch in zip(bar, batches):
            self_training = t.self_training_start is not None and it >= t.self_training_start
            losses = self.train_step(batch.to(device),
                                     refinement="rfm" if it >= t.rfm_start else "static",
                                     self_training=self_training)
            done = it + 1
            if done % t.log_every == 0 or done == t.iters:
                self.log(done, losses, on_log, bar)
                stopping = _any_rank(self.run.stop.is_set(), device)
            else:
                stopping = self.ranks == 1 and self.run.stop.is_set()
            if done % t.eval_every == 0 or done == t.iters:
                self.evaluate(done, on_eval)
            if stopping or done % t.checkpoint_every == 0 or done == t.iters:
                self.step("checkpoint", lambda: self.save_checkpoint(done), f"iteration {done}")
            if stopping and done < t.iters:
                bar.close()
                raise Stopped(f"{self.out}: stopped by a signal after iteration {done} of "
                              f"{t.iters}, checkpoint written; run again to resume")
        bar.close()

    def log(self, done: int, losses: dict, on_log, bar) -> None:
        """The losses of iteration ``done`` (the whole batch's, over the ranks) to losses.csv:
        the one place the loop reads values back from the device."""
        values = torch.stack([losses[k] for k in ("loss", "seg_loss", "aff_loss")])
        if self.ranks > 1:
            values = _sum_over_ranks(values)  # the shares add up to the batch's losses
        row = {**dict(zip(("loss", "seg_loss", "aff_loss"), values.tolist())),
               "lr": self.optimizer.param_groups[0]["lr"]}
        if self.main:
            _append_csv(self.out / "losses.csv", LOSS_COLUMNS, {"iteration": done, **row})
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if on_log:
                on_log(done, row)

    def evaluate(self, done: int, on_eval) -> None:
        """The periodic evaluation (rank 0) as a row of eval.csv; the other ranks wait."""
        if self.main:
            row = self.step("evaluate", lambda: self.evaluation(done), f"iteration {done}")
            _append_csv(self.out / "eval.csv", EVAL_COLUMNS, row)
            if on_eval:
                on_eval(done, row)
        distributed.barrier()

    def evaluation(self, done: int) -> dict:
        """The row of eval.csv at iteration ``done``."""
        t, device = self.t, self.run.device
        val = score(self.model, self.evals[t.val_split], device, t.eval_images, pseudo=False)
        row = {"iteration": done, "val_miou": round(100 * mean_iou(val["prediction"]), 2)}
        if not self.supervised:  # a model trained on masks makes no pseudo labels
            pseudo = score(self.model, self.evals[t.split], device, t.eval_images,
                           prediction=False)
            row["train_pseudo_miou"] = round(100 * mean_iou(pseudo["pseudo"]), 2)
        return row

    def save_checkpoint(self, done: int) -> None:
        """Everything ``resume`` restores, written atomically by rank 0, with the random
        generators of every rank (CPU, and CUDA on GPUs)."""
        rng = {name: _gather(state) if state is not None else []
               for name, state in rng_states(self.run.device).items()}
        if self.main:
            state = {"format": CHECKPOINT_FORMAT, "iteration": done, "fingerprint": self.fingerprint,
                     "decoder": self.decoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": rng}
            write_atomically(self.checkpoint, torch_bytes(state))

    def finish(self) -> Path:
        """Write model.pt (rank 0); returns its path."""
        self.model.decoder = self.decoder
        final = self.out / "model.pt"
        if self.main:
            self.step("save model", lambda: save_model(self.model, final))
        distributed.barrier()
        return final


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``Training.save_checkpoint``, loaded on the CPU (``resume`` moves
    each part to its device); a file that is not one is an error that names it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files that are not its own
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it "
                         "to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}; delete it "
                         "to start afresh")
    return state


def rng_states(device: torch.device) -> dict:
    """This process's random generators: the CPU's and, on a GPU, the device's (None else)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(rng: dict, rank: int, device: torch.device) -> None:
    """Set this rank's generators from a checkpoint's (CPU byte tensors, one per rank); a
    checkpoint of a CPU run leaves a GPU's generator as seeded."""
    torch.set_rng_state(rng["cpu"][rank])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(rng["cuda"][rank], device)


def _batches(data, batch_size: int, seed: int, start: int, workers: int, pin_memory: bool,
             slots: int):
    """This rank's part of every global batch from iteration ``start`` on, forever, each
    collated with ``slots`` class slots per image.

    A global batch is ``batch_size`` indices of a seeded permutation per epoch (the last partial
    batch dropped), whatever the number of ranks, so a resumed or scaled-out run sees the same
    data; rank r takes the r-th of equal slices.
    """
    ranks, rank = distributed.world_size(), distributed.rank()
    per_rank = batch_size // ranks
    per_epoch = len(data) // batch_size
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in count(first_epoch):
        order = torch.from_numpy(epoch_order(len(data), seed, epoch))
        batches = order[:per_epoch * batch_size].view(per_epoch, ranks, per_rank)[skip:, rank]
        # Its own generator (the workers' seeds): the loader must not draw from the global RNG
        # (dropout's), which the checkpoint restores.
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        skip = 0
        data.epoch = epoch  # TrainDataset seeds its augmentation with it
        yield from torch.utils.data.DataLoader(
            data, batch_sampler=batches.tolist(), num_workers=workers, generator=generator,
            collate_fn=partial(Batch.collate, slots=slots), pin_memory=pin_memory,
            multiprocessing_context=forkserver() if workers else None,
            worker_init_fn=die_with_parent if workers else None)


def _trim_csv(path: Path, columns, keep_below: int) -> None:
    """Keep the header and rows of iterations below ``keep_below``: rows an interrupted run
    logged after its last checkpoint are redone on resume. A file that is not such a table is
    an error naming it."""
    rows = []
    if path.exists():
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) < keep_below]
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a table of this run's iterations ({type(e).__name__}: "
                             f"{e}); delete it and checkpoint.pt to train afresh") from None
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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (so that all ranks stop at the same iteration)."""
    if distributed.world_size() == 1:
        return flag
    return bool(_sum_over_ranks(torch.tensor(float(flag), device=device)) > 0)


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order."""
    if distributed.world_size() == 1:
        return [obj]
    out = [None] * distributed.world_size()
    dist.all_gather_object(out, obj)
    return out


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
    # Self-training would replace the true masks by the model's own confident predictions.
    supervised = replace(params, train=replace(params.train, supervision="masks",
                                               features="online", self_training_start=None,
                                               out=str(out)))
    return train(supervised, on_log, on_eval, step)
