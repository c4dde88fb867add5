"""The GPU path: the same training step and predictions on CUDA as on the CPU. Skipped on
machines without a GPU (CI); run on one with `pytest tests/test_cuda.py`."""
import pytest
import torch

from weclip.dataset import Batch
from weclip.optim import build_optimizer
from weclip.training import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()


def batch():
    torch.manual_seed(0)
    return Batch(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), LABELS, torch.arange(2))


def test_pseudo_labels_on_cuda_match_the_cpu(tiny_model):
    images = batch().images
    cpu = tiny_model.eval()(images, LABELS).pseudo
    gpu = tiny_model.cuda()(images.cuda(), LABELS).pseudo.cpu()
    assert (cpu == gpu).float().mean() > 0.99


@pytest.mark.parametrize("amp", [False, True])
def test_a_training_step_on_cuda_learns(tiny_model, amp):
    model = tiny_model.cuda()
    model.decoder.dropout.p = 0.0
    step = TrainStep(model, build_optimizer(model, lr=2e-5), radius=2, amp=amp)
    data = batch().pin_memory().to("cuda")
    losses = [step(data, refinement="static")["loss"].item() for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_bfloat16_autocast_leaves_the_pseudo_labels_nearly_unchanged(tiny_model):
    model = tiny_model.cuda().eval()
    images = batch().images.cuda()
    full = model(images, LABELS).pseudo
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(images, LABELS).pseudo
    assert (full == half).float().mean() > 0.95
