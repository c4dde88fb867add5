"""The WeCLIP module: training forward, inference forward, a training step (METHOD.md 3-6)."""
import pytest
import torch

from weclip.optim import build_optimizer, poly_warmup
from weclip.training import TrainStep

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()


def test_training_forward_returns_logits_pseudo_labels_and_affinity(tiny_model):
    out = tiny_model(torch.randn(2, 3, 64, 96), LABELS)
    assert out.logits.shape == (2, 4, 4, 6)
    assert out.pseudo.shape == (2, 64, 96) and out.pseudo.dtype == torch.long
    assert out.affinity.shape == (2, 24, 24)
    assert ((out.affinity > 0) & (out.affinity < 1)).all()


@pytest.mark.parametrize("refinement", ["none", "static", "rfm"])
def test_pseudo_labels_use_only_background_and_present_classes(tiny_model, refinement):
    out = tiny_model(torch.randn(2, 3, 64, 64), LABELS, refinement=refinement)
    assert set(out.pseudo[0].unique().tolist()) <= {0, 1, 3}
    assert set(out.pseudo[1].unique().tolist()) <= {0, 2}


def test_inference_needs_no_labels_and_skips_the_cam_branch(tiny_model, monkeypatch):
    import weclip.model

    def fail(*args, **kwargs):
        raise AssertionError("CAM computed at inference")

    monkeypatch.setattr(weclip.model, "grad_cam", fail)
    out = tiny_model.eval()(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 4, 4, 4) and out.pseudo is None and out.affinity is None


def test_cached_features_give_the_same_output_as_running_the_backbone(tiny_model):
    tiny_model.eval()
    images = torch.randn(2, 3, 64, 64)
    direct = tiny_model(images, LABELS)
    cached = tiny_model(images, LABELS, features=tiny_model.backbone(images))
    assert torch.equal(direct.logits, cached.logits) and torch.equal(direct.pseudo, cached.pseudo)


def test_unknown_refinement_is_refused(tiny_model):
    with pytest.raises(ValueError, match="refinement"):
        tiny_model(torch.randn(2, 3, 64, 64), LABELS, refinement="crf")


def test_layer_counts_follow_the_backbone_depth(tiny_model):
    assert tiny_model.backbone.depth == 4
    assert (tiny_model.static_layers, tiny_model.rfm_layers) == (3, 2)  # 8/12 and 6/12 of 4


def test_training_step_updates_the_decoder_only(tiny_model):
    optimizer = build_optimizer(tiny_model, lr=1e-3)
    step = TrainStep(tiny_model, optimizer, poly_warmup(optimizer, 10, warmup_iters=0), radius=2)
    clip_before = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in tiny_model.decoder.state_dict().items()}
    result = step(torch.randn(2, 3, 64, 64), LABELS)
    assert torch.isfinite(result["loss"])
    assert all(p.grad is None for p in tiny_model.backbone.parameters())
    assert all(torch.equal(v, clip_before[k]) for k, v in tiny_model.backbone.state_dict().items())
    changed = [not torch.equal(v, decoder_before[k]) for k, v in tiny_model.decoder.state_dict().items()]
    assert all(changed)


def test_training_reduces_the_loss_on_a_fixed_batch(tiny_model):
    torch.manual_seed(0)
    optimizer = build_optimizer(tiny_model, lr=2e-5)
    step = TrainStep(tiny_model, optimizer, radius=2)
    images = torch.randn(2, 3, 64, 64)
    tiny_model.decoder.dropout.p = 0.0
    losses = [step(images, LABELS, refinement="static")["loss"].item() for _ in range(15)]
    assert losses[-1] < losses[0]
