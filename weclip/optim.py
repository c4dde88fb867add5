"""AdamW with linear warm-up and poly decay (METHOD.md section 6)."""
from __future__ import annotations

import torch


def build_optimizer(model, lr: float = 2e-4, decoder_lr_mult: float = 10.0,
                    betas=(0.9, 0.999), weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the decoder) at ``lr * decoder_lr_mult``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": params, "lr": lr * decoder_lr_mult}], lr=lr,
                             betas=tuple(betas), weight_decay=weight_decay, eps=1e-8)


def poly_warmup(optimizer, max_iters: int, warmup_iters: int = 50, warmup_ratio: float = 1e-6,
                power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor at step s: linear from ``warmup_ratio`` to 1 over the warm-up,
    then (1 - s / max_iters) ** power."""
    def factor(step: int) -> float:
        if step < warmup_iters:
            return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
        return max(0.0, 1 - step / max_iters) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
