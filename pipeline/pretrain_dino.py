"""Pretrain the world's small self-supervised ViT (weclip/model_configs) from scratch, for WeCLIP+.

DINO's self-distillation with iBOT's masked patch prediction, as DINOv2 trains, on the world's
'pretrain' split: no labels, no captions. A student ViT and its teacher, an exponential moving
average of it, see different random views of each scene: two global crops and a few local ones.
The student's class token, as a distribution over ``prototypes``, learns to predict the
teacher's (centred, sharpened) on the other global crop; the student's tokens of patches hidden
behind a mask token learn to predict the teacher's on the same crop unmasked. AdamW with warm-up
and cosine decay; the teacher's momentum rises to 1. Every random choice derives from (seed,
step), so a resumed run ends as an uninterrupted one. The result is the teacher, a plain timm
state dict as .safetensors, and ``knn_purity``, a figure of what its patch features learned.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from weclip.backbone import normalize
from weclip.dino import FrozenDINO, create_dino
from weclip.model_configs import TINY_DINO
from weclip.optim import cosine_warmup

from .pretraining import (CHECKPOINT_FILE, augment, batch_indices, finish, load_split, resume,
                          save_checkpoint, save_weights)

METRICS_FILE = "knn_purity.json"


class Head(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2-normalised, then the prototypes (a
    weight-normalised linear layer). Shared by the class token and the patch tokens (iBOT)."""

    def __init__(self, dim: int, prototypes: int, hidden: int = 256, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, prototypes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class Student(nn.Module):
    """A ViT and its head; ``forward`` takes crops and an optional patch mask."""

    def __init__(self, vit: nn.Module, prototypes: int):
        super().__init__()
        self.vit = vit
        self.head = Head(vit.embed_dim, prototypes)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        """Normalised crops [B, 3, s, s] (a multiple of the patch); mask: bool [B, n] over the
        n patches. Returns the head's logits of (the class token [B, K], the patches [B, n, K])."""
        v = self.vit
        x = v.patch_embed(images)  # [B, h, w, D]
        if mask is not None:
            x = torch.where(mask.view(*x.shape[:3], 1), self.mask_token.to(x.dtype), x)
        x = v.norm(v.blocks(v.norm_pre(v._pos_embed(x))))
        return self.head(x[:, 0]), self.head(x[:, v.num_prefix_tokens:])


def distillation(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                 student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """Cross-entropy of the student's distributions [..., K] against the teacher's, centred and
    sharpened: [...]."""
    target = ((teacher - center) / teacher_temp).softmax(-1)
    return -(target * (student / student_temp).log_softmax(-1)).sum(-1)


def views(images: torch.Tensor, generator: torch.Generator, global_size: int, local_size: int,
          locals_: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two global and ``locals_`` local random crops of uint8 images, normalised as the world's
    CLIP takes them (WeCLIP+ gives the DINO the CLIP's pixels)."""
    def crops(count, size, scale):
        return [normalize(augment(images, None, generator, scale, size)[0], "clip")
                for _ in range(count)]

    return crops(2, global_size, (0.35, 1.0)), crops(locals_, local_size, (0.08, 0.35))


def patch_masks(batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """iBOT's masks: half of the crops with a random 10-50% of their patches hidden."""
    ratio = torch.rand(batch, generator=generator) * 0.4 + 0.1
    ratio = torch.where(torch.rand(batch, generator=generator) < 0.5, ratio, 0.0)
    return torch.rand(batch, n, generator=generator) < ratio[:, None]


@torch.no_grad()
def knn_purity(dino: FrozenDINO, images: torch.Tensor, masks: torch.Tensor,
               neighbours: int = 10) -> dict:
    """How well patch features group by what the patches show: for each patch of the images
    (labelled with the ground-truth class at its centre), the share of its ``neighbours`` nearest
    patches (cosine, among the other images' patches) with the same class; the mean over
    patches of each class, then over classes, and the share chance would give."""
    tokens, grid = dino(normalize(images.float(), "clip"))
    labels = F.interpolate(masks[:, None].float(), size=grid, mode="nearest").flatten().long()
    features = F.normalize(tokens, dim=-1).flatten(0, 1)
    image = torch.arange(len(images)).repeat_interleave(grid[0] * grid[1])
    same = []
    for rows in torch.arange(len(labels)).split(2048):  # the similarities a chunk at a time
        similarity = features[rows] @ features.T
        similarity[image[rows, None] == image[None]] = -2  # neighbours from other images only
        nearest = similarity.topk(neighbours, dim=1).indices
        same.append((labels[nearest] == labels[rows, None]).float().mean(1))
    same = torch.cat(same)
    classes = labels.unique()
    per_class = {int(c): float(same[labels == c].mean()) for c in classes}
    # Features that know nothing give a class's patches neighbours of class c as often as c
    # occurs: purity share_c, whose mean over classes is 1 / classes.
    return {"purity": float(np.mean(list(per_class.values()))), "chance": 1 / len(classes),
            "per_class": per_class, "patches": len(labels)}


def pretrain_dino(world_dir: str | Path, out_dir: str | Path, *, model_name: str = TINY_DINO,
                  steps: int = 600, batch_size: int = 32, lr: float = 1e-3,
                  weight_decay: float = 0.04, warmup_steps: int = 50, prototypes: int = 256,
                  global_size: int = 96, local_size: int = 48, locals_: int = 4,
                  patch_weight: float = 1.0, momentum: float = 0.994, seed: int = 0,
                  num_threads: int = 2, checkpoint_every: int = 100,
                  eval_split: str = "val", eval_images: int = 100) -> dict:
    """Pretrain ``model_name`` on ``world_dir``'s 'pretrain' split for ``steps`` batches.

    The loss is the DINO term plus ``patch_weight`` x the iBOT term (``distillation``). AdamW at
    ``lr`` (``warmup_steps`` of linear warm-up, then cosine decay to 0 at ``steps``); the
    teacher's momentum goes from ``momentum`` to 1 along a cosine. Writes ``out_dir``/
    weights.safetensors (the teacher's ViT, a timm state dict) and ``out_dir``/knn_purity.json
    (figures on ``eval_images`` images of ``eval_split``, see ``knn_purity``, with those of the
    untrained ViT beside them), and returns the figures plus this call's per-step ``losses``.
    The ViT starts from ``create_dino``'s random weights whatever ``seed``, which draws the
    heads, views and masks: the untrained figures are those of the ViT it started from.
    Every ``checkpoint_every`` steps a checkpoint goes to ``out_dir``; a run with the same
    settings resumes from it, and it is removed once the weights are written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model_name": model_name, "steps": steps, "batch_size": batch_size, "lr": lr,
                "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "prototypes": prototypes, "global_size": global_size, "local_size": local_size,
                "locals": locals_, "patch_weight": patch_weight, "momentum": momentum,
                "seed": seed}
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    student = Student(create_dino(model_name, None), prototypes)
    teacher = Student(create_dino(model_name, None), prototypes)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    both = nn.ModuleDict({"student": student, "teacher": teacher})
    # The center is the teacher's running mean output, part of the state to resume.
    both.register_buffer("center", torch.zeros(2, prototypes))  # class token, patches
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = cosine_warmup(optimizer, steps, warmup_steps)
    start = resume(out_dir / CHECKPOINT_FILE, settings, both, optimizer, scheduler)

    data = load_split(world_dir, "pretrain", batch_size)
    patch = student.vit.patch_embed.patch_size[0]
    losses = []
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="pretrain DINO")
    for step in progress:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        images = data.images[batch_indices(step, len(data.images), batch_size, seed)]
        globals_, locals_views = views(images, generator, global_size, local_size, locals_)
        n = (global_size // patch) ** 2
        masks = [patch_masks(batch_size, n, generator) for _ in globals_]
        with torch.no_grad():
            targets = [teacher(view) for view in globals_]
        student.train()
        outputs = [student(view, mask) for view, mask in zip(globals_, masks)]
        outputs += [student(view) for view in locals_views]
        center = both.center
        image_loss = torch.stack([
            distillation(out[0], target[0], center[0]).mean()
            for t, target in enumerate(targets) for s, out in enumerate(outputs) if s != t]).mean()
        patch_loss = torch.stack([
            (distillation(outputs[i][1], targets[i][1], center[1]) * mask).sum()
            / mask.sum().clamp(min=1) for i, mask in enumerate(masks)]).mean()
        loss = image_loss + patch_weight * patch_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            m = 1 - (1 - momentum) * (math.cos(math.pi * step / steps) + 1) / 2
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(m).add_(s.detach(), alpha=1 - m)
            batch_center = torch.stack([torch.cat([t[0] for t in targets]).mean(0),
                                        torch.cat([t[1].flatten(0, 1) for t in targets]).mean(0)])
            center.mul_(0.9).add_(batch_center, alpha=0.1)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(out_dir / CHECKPOINT_FILE, settings, both, optimizer, scheduler,
                            step + 1)

    save_weights(out_dir, teacher.vit.state_dict(), {"timm_model": model_name})
    val = load_split(world_dir, eval_split)
    images, masks = val.images[:eval_images], val.masks[:eval_images].long()
    metrics = {"pretrained": knn_purity(FrozenDINO(teacher.vit), images, masks),
               "untrained": knn_purity(FrozenDINO(create_dino(model_name, None)), images, masks)}
    print(f"patch k-NN purity on {eval_split}: {metrics['pretrained']['purity']:.3f} "
          f"(untrained {metrics['untrained']['purity']:.3f}, chance "
          f"{metrics['pretrained']['chance']:.3f})", flush=True)
    return finish(out_dir, METRICS_FILE, metrics, settings, losses)
