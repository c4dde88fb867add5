"""The GPU path on a GPU: the same pseudo labels as on the CPU, a step that learns, reads nothing
back and compiles, and a run that resumes. Skipped on machines without a GPU (CI); run on one
with `pytest tests/test_cuda.py` (benchmarks/gpu_check.sh does)."""
import pytest
import torch

from helpers import read_rows
from pipeline.train import train
from weclip.batch import Batch, PresentClasses
from weclip.benchmark import count_dispatch
from weclip.optim import build_optimizer
from weclip.training import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()


def batch():
    torch.manual_seed(0)
    return Batch(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), LABELS, torch.arange(2),
                 PresentClasses.from_labels(LABELS))


def test_pseudo_labels_on_cuda_match_the_cpu(tiny_model):
    images = batch().images
    cpu = tiny_model.eval()(images, LABELS).pseudo
    gpu = tiny_model.cuda()(images.cuda(), LABELS).pseudo.cpu()
    assert (cpu == gpu).float().mean() > 0.99


@pytest.mark.parametrize("amp", [False, True])
def test_a_training_step_on_cuda_learns(tiny_model, amp):
    model = tiny_model.cuda()
    model.decoder.fusion.dropout.p = 0.0
    step = TrainStep(model, build_optimizer(model, lr=2e-5), radius=2, amp=amp)
    data = batch().pin_memory().to("cuda")
    losses = [step(data, refinement="static")["loss"].item() for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("amp", [False, True])
def test_a_training_step_on_cuda_reads_nothing_back(tiny_model, amp):
    model = tiny_model.cuda()
    step = TrainStep(model, build_optimizer(model), radius=2, amp=amp)
    data = batch().pin_memory().to("cuda")
    step(data)
    assert count_dispatch(step, data).total_syncs == 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(data)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bfloat16_autocast_leaves_the_pseudo_labels_nearly_unchanged(tiny_model):
    model = tiny_model.cuda().eval()
    images = batch().images.cuda()
    full = model(images, LABELS).pseudo
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(images, LABELS).pseudo
    assert (full == half).float().mean() > 0.95


def test_compiled_and_eager_pseudo_labels_agree_on_cuda(tiny_model):
    model = tiny_model.cuda().eval()
    data = batch().to("cuda")
    with torch.no_grad():
        features = model.features(data.images)
        aff = model(data.images, features=features, with_affinity=True).affinity
    eager = model.pseudo_labels(data.images, data.pairs, features, aff)
    model.compile_parts().train()  # the compiled parts serve training
    compiled = model.pseudo_labels(data.images, data.pairs, features, aff)
    assert (compiled == eager).float().mean() > 0.999


def test_an_interrupted_cuda_run_resumes_with_its_generators(toy_params, tmp_path):
    whole = toy_params(tmp_path / "whole", device="cuda")
    train(whole)

    def interrupt(iteration, row):
        if iteration == 4:
            raise KeyboardInterrupt

    broken = toy_params(tmp_path / "broken", device="cuda")
    with pytest.raises(KeyboardInterrupt):
        train(broken, on_eval=interrupt)
    state = torch.load(tmp_path / "broken" / "checkpoint.pt", map_location="cpu")
    (cuda_rng,) = state["rng"]["cuda"]
    assert cuda_rng.dtype == torch.uint8 and cuda_rng.device.type == "cpu"
    train(broken)  # must not fail restoring the CPU generator from a CUDA run

    a = torch.load(tmp_path / "whole" / "model.pt")["decoder"]
    b = torch.load(tmp_path / "broken" / "model.pt")["decoder"]
    # Bilinear upsampling's backward adds with atomics on a GPU: equal to rounding.
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    losses = [[float(r["loss"]) for r in read_rows(tmp_path / run / "losses.csv")]
              for run in ("whole", "broken")]
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-3)
