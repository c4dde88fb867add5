"""The train stage: WeCLIP's training loop with checkpoints, resume, loss log and evaluation.

Outputs under ``train.out``: ``checkpoint.pt`` (written atomically every ``checkpoint_every``
iterations; a rerun resumes from it), ``losses.csv`` (for `dvc plots`), ``eval.csv`` (periodic
pseudo-label mIoU on the train split and segmentation mIoU on the val split) and, at the end,
``model.pt`` (the decoder's weights and what is needed to rebuild the model).
"""
from __future__ import annotations

import csv
from itertools import count
from pathlib import Path

import torch
from tqdm import tqdm

from weclip import BackboneFeatures, FrozenCLIP, WeCLIP
from weclip.dataset import ClassInfo, EvalDataset, TrainDataset, read_classes
from weclip.files import write_atomically
from weclip.inference import predict
from weclip.metrics import confusion_matrix, mean_iou
from weclip.optim import build_optimizer, poly_warmup
from weclip.training import TrainStep

from .params import Params, params_fingerprint

LOSS_COLUMNS = ("iteration", "loss", "seg_loss", "aff_loss", "lr")
EVAL_COLUMNS = ("iteration", "train_pseudo_miou", "val_miou")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(params: Params, info: ClassInfo) -> WeCLIP:
    """The WeCLIP model of ``params`` for the classes of ``info`` (decoder untrained)."""
    backbone = FrozenCLIP.from_config(params.clip.arch, params.clip.weights)
    m = params.model
    return WeCLIP(backbone, info.prompts, info.background, template=params.clip.template,
                  decoder_dim=m.decoder_dim, decoder_layers=m.decoder_layers,
                  decoder_heads=m.decoder_heads, dropout=m.dropout,
                  box_threshold=m.box_threshold, static_layers=m.static_layers,
                  rfm_layers=m.rfm_layers, rfm_signed=m.rfm_signed,
                  background_power=m.background_power, par_dilations=m.par_dilations,
                  par_iters=m.par_iters)


def atomic_save(obj, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


@torch.no_grad()
def score(model: WeCLIP, dataset: EvalDataset, device, limit: int | None = None,
          pseudo: bool = True, prediction: bool = True) -> dict[str, torch.Tensor]:
    """Confusion matrices of the pseudo labels (RFM, with labels) and of the single-scale
    prediction over the first ``limit`` images of ``dataset`` (those with masks)."""
    model.eval()
    c = model.num_classes
    out = {k: torch.zeros(c, c, dtype=torch.long) for k, on in
           (("pseudo", pseudo), ("prediction", prediction)) if on}
    for i in dataset.with_masks(limit):
        image, _, mask, labels, _ = dataset[i]
        image = image[None].to(device)
        if pseudo:
            pl = model(image, labels[None]).pseudo[0].cpu()
            out["pseudo"] += confusion_matrix(pl, mask, c)
        if prediction:
            probs = predict(model, image, scales=(1.0,), flip=False, long_side=None)
            out["prediction"] += confusion_matrix(probs.argmax(1)[0].cpu(), mask, c)
    return out


def _batches(data, batch_size: int, seed: int, start: int, workers: int, collate=None):
    """Batches forever from iteration ``start``: a seeded permutation per epoch, last partial
    batch dropped, so a resumed run sees the same data."""
    per_epoch = len(data) // batch_size
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in count(first_epoch):
        # Its own generator: the loader must not draw from the global RNG (dropout's), which
        # the checkpoint restores.
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(data), generator=generator)
        batches = order[:per_epoch * batch_size].view(per_epoch, batch_size).tolist()[skip:]
        skip = 0
        data.epoch = epoch  # TrainDataset seeds its augmentation with it
        # Workers forked from a process running Prefect's threads die at start; forkserver
        # workers start from a clean process.
        context = "forkserver" if workers else None
        yield from torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=workers,
                                               generator=generator, collate_fn=collate,
                                               multiprocessing_context=context)


def _to(features: BackboneFeatures, device) -> BackboneFeatures:
    return BackboneFeatures(features.tokens.to(device, non_blocking=True),
                            features.attn.to(device, non_blocking=True), features.grid)


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


def train(params: Params, on_log=None, on_eval=None) -> Path:
    """Train WeCLIP as ``params`` say; resume from ``train.out``/checkpoint.pt when present.

    ``on_log(iteration, losses)`` and ``on_eval(iteration, mious)`` are called after each
    logged iteration and each periodic evaluation. Returns the path of model.pt.
    """
    t = params.train
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    root = params.dataset_dir
    info = read_classes(root)
    model = build_model(params, info).to(device)
    optimizer = build_optimizer(model, t.lr, t.decoder_lr_mult, t.betas, t.weight_decay)
    scheduler = poly_warmup(optimizer, t.iters, t.warmup_iters, t.warmup_ratio, t.power)
    step = TrainStep(model, optimizer, scheduler, radius=t.radius,
                     affinity_weight=t.affinity_weight, ignore_index=info.ignore_index, amp=t.amp)

    checkpoint, start = out / "checkpoint.pt", 0
    fingerprint = params_fingerprint(params, ("data", "clip", "model", "train"))
    state = torch.load(checkpoint, map_location=device, weights_only=False) if checkpoint.exists() else None
    if state is not None and state.get("fingerprint") != fingerprint:
        print(f"{checkpoint}: made with other parameters; starting afresh", flush=True)
        state = None
    if state is not None:
        model.decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = state["iteration"]
    for name, columns in (("losses.csv", LOSS_COLUMNS), ("eval.csv", EVAL_COLUMNS)):
        _trim_csv(out / name, columns, keep_below=start + 1)

    supervised = t.supervision == "masks"
    if t.supervision not in ("pseudo", "masks"):
        raise ValueError(f"train.supervision: {t.supervision!r} is neither 'pseudo' nor 'masks'")
    if t.features == "online":
        data = TrainDataset(root, t.split, t.crop_size, t.scale_range, params.clip.normalization,
                            t.seed, with_masks=supervised)
        batches = _batches(data, t.batch_size, t.seed, start, t.workers)
    elif t.features == "cache" and not supervised:
        from .cache import CachedFeatures

        data = CachedFeatures(params.cache.path, model.backbone)
        batches = _batches(data, t.batch_size, t.seed, start, t.workers, data.collate)
    else:
        raise ValueError(f"train.features: {t.features!r} with supervision {t.supervision!r}: "
                         "use 'online' (the cache holds no masks) or 'cache' with pseudo labels")
    if len(data) < t.batch_size:
        raise ValueError(f"{root}: split {t.split!r} has {len(data)} images, fewer than a batch")
    evals = {s: EvalDataset(root, s, params.clip.normalization) for s in (t.split, t.val_split)}

    bar = tqdm(range(start, t.iters), initial=start, total=t.iters, desc="train", unit="it")
    for it, (images, labels, extra) in zip(bar, batches):
        features = _to(extra, device) if t.features == "cache" else None
        masks = extra.to(device) if supervised else None
        result = step(images.to(device, non_blocking=True), labels, features=features,
                      masks=masks, refinement="rfm" if it >= t.rfm_start else "static")
        done = it + 1
        if done % t.log_every == 0 or done == t.iters:
            row = {k: float(result[k]) for k in ("loss", "seg_loss", "aff_loss")}
            _append_csv(out / "losses.csv", LOSS_COLUMNS,
                        {"iteration": done, **row, "lr": optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if on_log:
                on_log(done, row)
        if done % t.checkpoint_every == 0 or done == t.iters:
            atomic_save({"iteration": done, "decoder": model.decoder.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "torch_rng": torch.get_rng_state(), "fingerprint": fingerprint},
                        checkpoint)
        if done % t.eval_every == 0 or done == t.iters:
            val_conf = score(model, evals[t.val_split], device, t.eval_images, pseudo=False)
            row = {"iteration": done, "val_miou": round(100 * mean_iou(val_conf["prediction"]), 2)}
            if not supervised:  # a model trained on masks makes no pseudo labels
                train_conf = score(model, evals[t.split], device, t.eval_images, prediction=False)
                row["train_pseudo_miou"] = round(100 * mean_iou(train_conf["pseudo"]), 2)
            _append_csv(out / "eval.csv", EVAL_COLUMNS, row)
            if on_eval:
                on_eval(done, row)
    bar.close()
    final = out / "model.pt"
    atomic_save({"decoder": model.decoder.state_dict(), "classes": info.classes,
                 "clip": vars(params.clip), "model": vars(params.model)}, final)
    return final
