"""Pretrain the small CLIP (weclip/model_configs) from scratch on the synthetic world.

Trains on the world's 'pretrain' split with three terms: open_clip's ClipLoss on (image,
caption); a region term, InfoNCE between a random region of each image and a caption of what
the region shows, the region's feature being the mean of its patch tokens after blocks 1..N-1
(through ln_post and the projection), computed in the context of the whole image; and an
attention term that pulls the mean attention of the blocks WeCLIP's static refinement walks on
towards grouping patches by what they show. AdamW with linear warm-up and cosine decay; random
resized crops, flips and FLIP patch dropout. Every random choice derives from (seed, step), so
a run resumed from its checkpoint ends with the same weights as an uninterrupted one (for the
same ``num_threads``). The result is a plain open_clip state dict as .safetensors, plus its
zero-shot figures on the val split.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.datasets.world import describe
from weclip.backbone import embed, normalize, run_block
from weclip.contract import read_classes
from weclip.model_configs import TINY_CLIP, register_model_configs
from weclip.optim import cosine_warmup
from weclip.refine import scaled_layers

from .pretraining import (CHECKPOINT_FILE, Split, augment, batch_indices, finish, load_split,
                          resume, save_checkpoint, save_weights)

METRICS_FILE = "zero_shot.json"


def encode_patches(visual: torch.nn.Module, images: torch.Tensor,
                   keep: torch.Tensor | None = None, attention_blocks: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """open_clip's image tower up to its pooling: normalised images [B, 3, S, S] -> projected
    patch features [B, K, E] (not normalised) of the patches in ``keep`` (long [B, K], FLIP's
    patch dropout), or of all patches: (after block N, whose mean is ``encode_image``'s feature;
    after block N-1, through the same ln_post and projection; the head-averaged attention
    [B, 1+K, 1+K] of the last ``attention_blocks`` blocks, averaged, or None for 0)."""
    x = embed(visual, images, keep)
    blocks, maps = visual.transformer.resblocks, []
    for i, block in enumerate(blocks):
        if i == len(blocks) - 1:
            before_last = visual.ln_post(x[:, 1:]) @ visual.proj
        x, weights = run_block(block, x, need_weights=i >= len(blocks) - attention_blocks)
        if weights is not None:
            maps.append(weights)
    x = visual.ln_post(x)
    return x[:, 1:] @ visual.proj, before_last, torch.stack(maps).mean(0) if maps else None


def sample_regions(shares: torch.Tensor, grid: int, generator: torch.Generator,
                   side: tuple[float, float] = (0.25, 0.6), min_fraction: float = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random box of patches per image and what it shows.

    shares: [B, grid * grid, C] each patch's class shares (``patch_shares``; index 0 the
    background). A box is ``side`` of the grid wide and high (each drawn). Returns (cells bool
    [B, grid * grid], the box's patches; shown bool [B, C], where a class or the background
    covers at least ``min_fraction`` of the box).
    """
    b = shares.shape[0]
    lo, hi = max(1, round(side[0] * grid)), round(side[1] * grid)
    h, w = torch.randint(lo, hi + 1, (2, b), generator=generator)
    y0 = (torch.rand(b, generator=generator) * (grid - h + 1)).long()
    x0 = (torch.rand(b, generator=generator) * (grid - w + 1)).long()
    cell = torch.arange(grid)[None]
    inside_y = (cell >= y0[:, None]) & (cell < (y0 + h)[:, None])
    inside_x = (cell >= x0[:, None]) & (cell < (x0 + w)[:, None])
    cells = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1).float()  # [B, grid * grid]
    in_box = (cells[..., None] * shares).sum(1) / cells.sum(1)[:, None]
    return cells.bool(), in_box >= min_fraction


def region_loss(region_features: torch.Tensor, text_features: torch.Tensor,
                caption_index: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways between regions [B, E] and the batch's distinct captions [U, E] (both
    unit), where region i shows caption ``caption_index[i]``; a caption shown by several regions
    has each of them as a positive."""
    logits = logit_scale * region_features @ text_features.T  # [B, U]
    positives = F.one_hot(caption_index, len(text_features)).T.float()  # [U, B]
    to_images = -(positives * logits.T.log_softmax(-1)).sum(-1) / positives.sum(-1)
    return (F.cross_entropy(logits, caption_index) + to_images.mean()) / 2


def patch_shares(masks: torch.Tensor, num_classes: int, grid: int) -> torch.Tensor:
    """The share of each class (index 0 the background) in each patch: long [B, S, S] ->
    [B, grid * grid, num_classes]."""
    one_hot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, masks.shape[-1] // grid).flatten(2).transpose(1, 2)


def attention_loss(attn: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between patch-to-patch attention and grouping by what patches show.

    attn: [B, 1+K, 1+K] head-averaged attention (class token first); shares: [B, K, C] class
    shares of the K patches. Each patch's target spreads over the patches in proportion to the
    overlap of their shares, share_i . share_j; the attention rows are renormalised over the
    patches, so attention to the class token is neither rewarded nor penalised.
    """
    attn = attn[:, 1:, 1:]
    attn = attn / attn.sum(-1, keepdim=True)
    target = shares @ shares.transpose(1, 2)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-8)
    return -(target * attn.clamp(min=1e-8).log()).sum(-1).mean()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; as in CLIP, gains, biases, embeddings of rank 1 and the logit scale get no decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


@dataclass
class CaptionedBatch:
    """One step's batch of B augmented images and its random choices."""

    images: torch.Tensor  # normalised [B, 3, S, S]
    captions: list[str]  # [B] the images' captions
    keep: torch.Tensor  # long [B, K] the patches kept (FLIP's patch dropout)
    shares: torch.Tensor  # [B, grid * grid, C] each patch's class shares (``patch_shares``)
    cells: torch.Tensor  # bool [B, grid * grid] each image's region (``sample_regions``)
    region_captions: list[str]  # [B] what each region shows


def sample_batch(data: Split, step: int, batch_size: int, seed: int, grid: int, n_keep: int,
                 num_classes: int) -> CaptionedBatch:
    """Step ``step``'s batch of ``data``, each random choice drawn from (``seed``, ``step``), so
    that a resumed run draws the batches an uninterrupted one would."""
    index = batch_indices(step, len(data.images), batch_size, seed)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    images, masks = augment(data.images[index], data.masks[index], generator)
    keep = torch.rand(batch_size, grid * grid, generator=generator).argsort(1)[:, :n_keep]
    shares = patch_shares(masks, num_classes, grid)
    cells, shown = sample_regions(shares, grid, generator)
    region_captions = [describe((row[1:].nonzero()[:, 0] + 1).tolist(),
                                data.backgrounds[i] if row[0] else None)
                       for i, row in zip(index, shown)]
    return CaptionedBatch(normalize(images, "clip"), [data.captions[i] for i in index], keep, shares,
                 cells, region_captions)


def batch_loss(model: torch.nn.Module, tokenizer, batch: CaptionedBatch, region_weight: float,
               attention_weight: float, attention_blocks: int) -> torch.Tensor:
    """The training loss of ``batch``, a scalar: ClipLoss on (image, caption) plus
    ``region_weight`` x ``region_loss`` on (region, what it shows) plus ``attention_weight`` x
    ``attention_loss`` on the mean attention of the last ``attention_blocks`` blocks."""
    b = len(batch.captions)
    distinct = sorted(set(batch.region_captions))
    caption_index = torch.tensor([distinct.index(c) for c in batch.region_captions])
    patches, before_last, attn = encode_patches(model.visual, batch.images, batch.keep,
                                                attention_blocks)
    # Regions read block N-1's tokens, not block N's: Grad-CAM reads block N through its
    # attention branch only, and needs that block's attention to gather the objects.
    in_region = batch.cells.gather(1, batch.keep).float()[..., None]  # [B, K, 1]
    region = (before_last * in_region).sum(1) / in_region.sum(1).clamp(min=1)
    texts = model.encode_text(tokenizer(batch.captions + distinct), normalize=True)
    scale = model.logit_scale.exp()
    loss = open_clip.ClipLoss()(F.normalize(patches.mean(1), dim=-1), texts[:b], scale)
    loss = loss + region_weight * region_loss(F.normalize(region, dim=-1), texts[b:],
                                              caption_index, scale)
    if attention_weight:
        kept = batch.shares.gather(1, batch.keep[..., None].expand(-1, -1, batch.shares.shape[-1]))
        loss = loss + attention_weight * attention_loss(attn, kept)
    return loss


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> unit image embeddings [N, E]."""
    model.eval()
    features = [model.encode_image(normalize(images[i:i + batch_size].float(), "clip"), normalize=True)
                for i in range(0, len(images), batch_size)]
    return torch.cat(features)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts [K] -> unit text embeddings [K, E]."""
    model.eval()
    return model.encode_text(tokenizer(texts), normalize=True)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: scores float [N], targets {0, 1} [N] (mean precision at each positive)."""
    hits = targets[np.argsort(-scores, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(hits.sum(), 1))


def zero_shot(model: torch.nn.Module, tokenizer, world_dir: str | Path, split: str = "val",
              template: str = "a photo of {}.") -> dict:
    """Zero-shot figures of ``model`` on a world split, with ``template`` filled with the class
    prompts and background words of classes.json.

    mAP: multi-label, mean over classes of the AP of image-prompt similarity.
    top1_largest: the best class prompt is the class of the image's largest visible object.
    background_top1: the best background prompt is the image's background.
    """
    info = read_classes(world_dir)
    data = load_split(world_dir, split)
    image_features = encode_images(model, data.images)
    class_texts = [template.format(prompt) for prompt in info.prompts]
    class_scores = (image_features @ encode_texts(model, tokenizer, class_texts).T).numpy()
    background_texts = [template.format(word) for word in info.background]
    background_scores = image_features @ encode_texts(model, tokenizer, background_texts).T

    targets = np.zeros_like(class_scores)
    for i, labels in enumerate(data.labels):
        targets[i, [c - 1 for c in labels]] = 1
    # Per image, not one one-hot tensor of the whole split (590 MB for 500 images).
    areas = torch.stack([torch.bincount(m.flatten(), minlength=info.num_classes)
                         for m in data.masks.long()])[:, 1:]
    largest = areas.argmax(1).numpy()
    backgrounds = np.array([info.background.index(word) for word in data.backgrounds])
    present = targets.sum(0) > 0
    return {
        "images": len(data.labels),
        "mAP": float(np.mean([average_precision(class_scores[:, c], targets[:, c])
                              for c in np.flatnonzero(present)])),
        "top1_largest": float((class_scores.argmax(1) == largest).mean()),
        "background_top1": float((background_scores.argmax(1).numpy() == backgrounds).mean()),
    }


def pretrain_clip(world_dir: str | Path, out_dir: str | Path, *, model_name: str = TINY_CLIP,
                  steps: int = 900, batch_size: int = 64, lr: float = 1e-3,
                  weight_decay: float = 0.1, warmup_steps: int = 50, patch_dropout: float = 0.5,
                  region_weight: float = 1.0, attention_weight: float = 0.3,
                  attention_blocks: int | None = None, seed: int = 0, num_threads: int = 2,
                  checkpoint_every: int = 100, eval_split: str = "val",
                  template: str = "a photo of {}.") -> dict:
    """Pretrain ``model_name`` on ``world_dir``'s 'pretrain' split for ``steps`` batches.

    The loss is ``batch_loss``; ``attention_blocks`` defaults to 8/12 of the depth, the blocks
    WeCLIP's static refinement walks on. AdamW (``make_optimizer``) at ``lr`` with ``warmup_steps``
    of linear warm-up, then cosine decay to 0 at ``steps`` (``cosine_warmup``).
    ``patch_dropout`` is the share of patches dropped (FLIP): it trades a little accuracy per
    step for about twice the steps per second.

    Writes ``out_dir``/weights.safetensors (an open_clip state dict) and ``out_dir``/zero_shot.json
    (figures on ``eval_split``, see ``zero_shot``), and returns the figures plus this call's
    per-step ``losses``. Every ``checkpoint_every`` steps a checkpoint goes to ``out_dir``; a run
    with the same settings resumes from it, and it is removed once the weights are written.
    The defaults take about 15 minutes with 2 threads of a 2-core CPU.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model_name": model_name, "steps": steps, "batch_size": batch_size, "lr": lr,
                "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "patch_dropout": patch_dropout, "region_weight": region_weight,
                "attention_weight": attention_weight, "attention_blocks": attention_blocks,
                "seed": seed}
    torch.set_num_threads(num_threads)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        register_model_configs()
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name)
        tokenizer = open_clip.get_tokenizer(model_name)
        optimizer = make_optimizer(model, lr, weight_decay)
        scheduler = cosine_warmup(optimizer, steps, warmup_steps)
        start = resume(out_dir / CHECKPOINT_FILE, settings, model, optimizer, scheduler)

        data = load_split(world_dir, "pretrain", batch_size)
        size, grid = model.visual.image_size[0], model.visual.grid_size[0]
        # The blocks whose mean attention WeCLIP's static refinement walks on; none without
        # the term.
        depth = len(model.visual.transformer.resblocks)
        attention_blocks = (attention_blocks or scaled_layers(depth, 8)) if attention_weight else 0
        if data.images.shape[-1] != size:
            raise ValueError(f"{world_dir}: images of {data.images.shape[-1]} px, {model_name} "
                             f"takes {size} px")
        info = read_classes(world_dir)
        n_keep = max(1, round(grid * grid * (1 - patch_dropout)))
        losses = []
        progress = tqdm(range(start, steps), initial=start, total=steps, desc="pretrain CLIP")
        model.train()
        for step in progress:
            batch = sample_batch(data, step, batch_size, seed, grid, n_keep, info.num_classes)
            loss = batch_loss(model, tokenizer, batch, region_weight, attention_weight,
                              attention_blocks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step_lr = scheduler.get_last_lr()[0]
            scheduler.step()
            # CLIP caps the temperature at 100 to keep training stable.
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{step_lr:.1e}")
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(out_dir / CHECKPOINT_FILE, settings, model, optimizer, scheduler,
                                 step + 1)

        save_weights(out_dir, model.state_dict(), {"open_clip_model": model_name})
        started = time.monotonic()
        metrics = zero_shot(model, tokenizer, world_dir, eval_split, template)
        print(f"zero-shot on {eval_split} ({time.monotonic() - started:.0f} s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "images"), flush=True)
        return finish(out_dir, METRICS_FILE, metrics, settings, losses)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
