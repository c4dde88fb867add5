"""Optimiser and learning-rate schedule (docs/method.md, section 6)."""
import math

import torch

from weclip.optim import build_optimizer, cosine_warmup, poly_warmup


def lrs(max_iters, steps, schedule=poly_warmup, **kwargs):
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, lr=2e-4)
    scheduler = schedule(optimizer, max_iters, **kwargs)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_decoder_learns_at_ten_times_the_base_rate_with_adamw_settings():
    optimizer = build_optimizer(torch.nn.Linear(2, 2))
    group = optimizer.param_groups[0]
    assert math.isclose(group["lr"], 2e-3) and group["weight_decay"] == 0.01
    assert group["betas"] == (0.9, 0.999)


def test_warmup_rises_linearly_from_the_ratio_then_decays_polynomially():
    values = lrs(1000, 1000, warmup_iters=50, warmup_ratio=1e-6, power=1.0)
    assert math.isclose(values[0], 2e-3 * 1e-6)
    assert math.isclose(values[25], 2e-3 * (1 - 0.5 * (1 - 1e-6)))
    assert math.isclose(values[50], 2e-3 * (1 - 50 / 1000))
    assert math.isclose(values[999], 2e-3 * (1 - 999 / 1000))


def test_cosine_warmup_rises_to_the_rate_at_the_end_of_warmup_then_decays_to_zero():
    values = lrs(100, 101, cosine_warmup, warmup_iters=10)
    assert math.isclose(values[0], 2e-3 * 1 / 10)
    assert math.isclose(values[9], 2e-3)
    assert math.isclose(values[10], 2e-3)
    assert math.isclose(values[55], 2e-3 * 0.5)
    assert math.isclose(values[100], 0, abs_tol=1e-18)
    assert all(a < b for a, b in zip(values[:9], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
