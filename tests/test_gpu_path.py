"""The CUDA path, proven on the CPU (docs/scaling.md): a training step reads nothing back from the
device, launches at most 1,000 ops at the paper's size, keeps one shape whatever the labels,
places every tensor on the model's device (run on a fake GPU and on the meta device), compiles
without graph breaks, and resumes its generators on any device."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from weclip.batch import Batch, PresentClasses
from weclip.benchmark import count_dispatch, random_batch
from weclip.config import ModelConfig
from weclip.contract import ClassInfo
from weclip.factory import create_model
from weclip.inference import predict
from weclip.losses import affinity_labels, affinity_loss, radius_mask, seg_loss
from weclip.optim import build_optimizer, poly_warmup
from weclip.profiling import DispatchCounter
from weclip.training import TrainStep

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()


def toy_batch(labels=LABELS, slots=2) -> Batch:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, 64, 64), dtype=torch.uint8)
    return Batch(images, labels, torch.arange(len(labels)), PresentClasses.from_labels(labels, slots))


def train_step(model) -> TrainStep:
    """WeCLIP's step, or WeCLIP+'s with its Dice and cross-branch losses."""
    optimizer = build_optimizer(model, lr=1e-4)
    plus = dict(dice_weight=1.0, cross_weight=0.1) if model.config.dino else {}
    return TrainStep(model, optimizer, poly_warmup(optimizer, 10), radius=2, **plus)


@pytest.fixture(params=["weclip", "weclip+"])
def either_model(request):
    """The tiny WeCLIP, and the tiny WeCLIP+."""
    return request.getfixturevalue({"weclip": "tiny_model", "weclip+": "tiny_plus_model"}[request.param])


def test_the_counter_tells_device_reads_from_host_reads():
    weights, host = torch.ones(3), torch.ones(3)
    with DispatchCounter([weights]) as counter:
        (weights * 2).sum().item()  # a device value read on the host
        bool((weights > 0).all())
        host.sum().item()  # host data: free
        torch.zeros(2, device="cpu").nonzero()  # made on the device
    assert counter.syncs == {("other", "_local_scalar_dense"): 2, ("other", "nonzero"): 1}
    # mul, sum, the read, gt, all, the read, zeros, nonzero; not host.sum nor its read
    assert counter.total_launches == 8


def test_a_training_step_reads_nothing_back_from_the_device(either_model):
    step = train_step(either_model)
    batch = toy_batch()
    step(batch, self_training=True)
    counter = count_dispatch(step, batch, self_training=True)
    assert counter.total_syncs == 0, dict(counter.syncs)
    assert counter.launches["backward + optimiser"] > 0  # the whole step was counted


def test_mixed_precision_casts_the_frozen_backbones_once_and_still_learns(either_model):
    model = either_model
    for dropout in model.modules():
        if isinstance(dropout, torch.nn.modules.dropout._DropoutNd):
            dropout.p = 0.0
    plus = dict(dice_weight=1.0, cross_weight=0.1) if model.config.dino else {}
    step = TrainStep(model, build_optimizer(model, lr=2e-5), radius=2, amp=True, **plus)
    frozen = [*model.backbone.visual.transformer.resblocks[:-1].parameters(),
              *(model.dino.parameters() if model.config.dino else [])]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in model.backbone.visual.transformer.resblocks[-1].parameters()} == {
        torch.float32}  # Grad-CAM differentiates through block N
    batch = toy_batch()
    losses = [step(batch, refinement="static")["loss"].item() for _ in range(10)]
    assert losses[-1] < losses[0]


def test_each_par_iteration_is_one_launch(tiny_model):
    batch = toy_batch()
    launches = []
    for iterations in (2, 6):
        tiny_model.par.num_iter = iterations
        step = train_step(tiny_model)
        step(batch)
        launches.append(count_dispatch(step, batch).launches["PAR"])
    assert launches[1] - launches[0] == 4


@pytest.mark.slow
def test_a_step_at_the_papers_size_launches_at_most_1000_ops():
    classes = ClassInfo("twenty", [f"class {i}" for i in range(20)],
                        [f"class {i}" for i in range(20)], ["ground", "sky"])
    model = create_model(ModelConfig(arch="ViT-B-16", weights=None), classes)
    step = train_step(model)
    batch = random_batch(4, 320, 20, torch.Generator().manual_seed(0))
    step(batch)
    counter = count_dispatch(step, batch)
    assert counter.total_launches <= 1000, dict(counter.launches)
    assert counter.total_syncs == 0


class ShapeRecorder(TorchDispatchMode):
    """The (op, output shapes) of everything dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), shapes))
        return out


def test_the_pseudo_labels_keep_one_shape_whatever_the_labels(either_model):
    either_model.eval()
    traces = []
    for labels in ([[1, 0, 1], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]):
        batch = toy_batch(torch.tensor(labels).float(), slots=3)
        with torch.no_grad():
            features = either_model.features(batch.images)
            aff = either_model(batch.images, features=features, with_affinity=True).affinity
        with ShapeRecorder() as recorder:
            either_model.pseudo_labels(batch.images, batch.pairs, features, aff)
        traces.append(recorder.ops)
    assert traces[0] == traces[1]


def test_the_forward_parts_run_on_a_fake_gpu_without_host_reads(either_model):
    """Every tensor must be made on the model's device: on a fake cuda:0, a tensor made on the
    CPU meets the model's in some op and fails; a host read fails or is counted. (A fake GPU
    runs no autograd, so Grad-CAM is given as fake CAMs; it runs on the meta device below.)"""
    model, batch = either_model, toy_batch()
    kind = type(model)
    with FakeTensorMode() as mode:
        state = {name: mode.from_tensor(t).to("cuda") for name, t in
                 [*model.named_parameters(), *model.named_buffers()]}
        gpu = batch._map(mode.from_tensor).to("cuda")
        cams = torch.rand(2, 2, 4, 4, device="cuda")
        with DispatchCounter() as counter:
            features = _call(model, state, kind.features, gpu.images)
            out = _call(model, state, kind.forward, gpu.images, features=features,
                        with_affinity=True)
            scale = _call(model, state, kind.cam_scale, out.logits, features, gpu.pairs)
            refined = _call(model, state, kind.refined_cams, cams, features.attn,
                            out.affinity, "rfm", (64, 64), scale)
            pseudo = _call(model, state, kind.labels_from_cams, gpu.images, refined,
                           gpu.pairs)
            logits = F.interpolate(out.logits, size=(64, 64), mode="bilinear")
            seg_loss(logits, pseudo)
            mask = radius_mask(4, 4, 2, device="cuda")
            affinity_loss(out.affinity, affinity_labels(pseudo, mask))
            probs = _call(model, state, predict, gpu.images.float())
        assert pseudo.device.type == probs.device.type == "cuda"
    assert counter.total_syncs == 0, dict(counter.syncs)


class _Calling(torch.nn.Module):
    """``fn(model, ...)`` as a module's forward, for torch.func.functional_call."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def _call(model, state, fn, *args, **kwargs):
    """``fn(model, *args, **kwargs)`` with the model's parameters and buffers from ``state``."""
    state = {f"model.{name}": t for name, t in state.items()}
    return functional_call(_Calling(model, fn), state, args, kwargs, strict=True)


def test_a_whole_training_step_runs_on_the_meta_device(either_model):
    model = either_model.to("meta")
    step = train_step(model)
    out = step(toy_batch().to("meta"), self_training=True)
    assert out["loss"].device.type == "meta" and out["targets"].shape == (2, 64, 64)
    assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("part", ["initial_cams", "refined_cams", "labels_from_cams"])
def test_the_pseudo_label_parts_compile_without_graph_breaks(tiny_model, part):
    tiny_model.eval()
    batch = toy_batch()
    with torch.no_grad():
        features = tiny_model.features(batch.images)
        aff = tiny_model(batch.images, features=features, with_affinity=True).affinity
        cams = tiny_model.initial_cams(features.tokens[:, -1], features.grid, batch.pairs)
    args = {"initial_cams": (features.tokens[:, -1], features.grid, batch.pairs),
            "refined_cams": (cams, features.attn, aff, "rfm", (64, 64)),
            "labels_from_cams": (batch.images, F.interpolate(cams, size=(64, 64)), batch.pairs)}
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(getattr(tiny_model, part))(*args[part])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_and_eager_pseudo_labels_agree(tiny_model):
    batch = toy_batch()
    with torch.no_grad():
        features = tiny_model.features(batch.images)
        aff = tiny_model(batch.images, features=features, with_affinity=True).affinity
    tiny_model.eval()
    eager = tiny_model.pseudo_labels(batch.images, batch.pairs, features, aff)
    tiny_model.compile_parts().train()  # compiled parts run in training mode
    compiled = tiny_model.pseudo_labels(batch.images, batch.pairs, features, aff)
    assert (compiled == eager).float().mean() > 0.999


def test_resume_sets_a_gpus_generator_from_the_checkpoints_cpu_bytes(monkeypatch):
    from pipeline.train import restore_rng

    set_on = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on.append(
        (state.device.type, state.dtype, device)))
    cpu = torch.get_rng_state()
    rng = {"cpu": [cpu, cpu], "cuda": [torch.ByteTensor(16), torch.ByteTensor(16)]}
    restore_rng(rng, 1, torch.device("cuda", 1))
    assert set_on == [("cpu", torch.uint8, torch.device("cuda", 1))]
    restore_rng({"cpu": [cpu], "cuda": []}, 0, torch.device("cuda", 0))  # a CPU run's
    assert len(set_on) == 1
