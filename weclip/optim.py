"""AdamW, and learning-rate schedules of a linear warm-up then a decay (docs/method.md, section 6)."""
from __future__ import annotations

import math
from typing import Callable

import torch


def build_optimizer(model, lr: float = 2e-4, decoder_lr_mult: float = 10.0,
                    betas=(0.9, 0.999), weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the decoder) at ``lr * decoder_lr_mult``.

    The fused implementation where torch has one for the parameters' device (CPU and CUDA):
    one kernel for all parameters instead of a dozen small ones per parameter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.AdamW([{"params": params, "lr": lr * decoder_lr_mult}], lr=lr,
                             betas=tuple(betas), weight_decay=weight_decay, eps=1e-8,
                             fused=fused)


def warmup_then_decay(optimizer, warmup_iters: int, warmup: Callable[[int], float],
                      decay: Callable[[int], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor at step s: ``warmup(s)`` for s < ``warmup_iters``, then ``decay(s)``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup(step) if step < warmup_iters else decay(step))


def poly_warmup(optimizer, max_iters: int, warmup_iters: int = 50, warmup_ratio: float = 1e-6,
                power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor at step s: linear from ``warmup_ratio`` to 1 over the warm-up,
    then (1 - s / max_iters) ** power."""
    return warmup_then_decay(
        optimizer, warmup_iters,
        warmup=lambda step: 1 - (1 - step / warmup_iters) * (1 - warmup_ratio),
        decay=lambda step: max(0.0, 1 - step / max_iters) ** power)


def cosine_warmup(optimizer, max_iters: int,
                  warmup_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor at step s: (s + 1) / warmup_iters over the warm-up, then a cosine
    from 1 down to 0 at ``max_iters``."""
    def cosine(step: int) -> float:
        progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return warmup_then_decay(optimizer, warmup_iters,
                             warmup=lambda step: (step + 1) / warmup_iters, decay=cosine)
