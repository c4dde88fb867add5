"""The WeCLIP module: training forward, inference forward, a training step, its model file
(docs/method.md, sections 3-6)."""
import pytest
import torch

from weclip import create_model, load_model, save_model
from weclip.batch import Batch, PresentClasses
from weclip.optim import build_optimizer, poly_warmup
from weclip.training import TrainStep

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()


def images(*shape):
    return torch.rand(*shape) * 255


def test_training_forward_returns_logits_pseudo_labels_and_affinity(tiny_model):
    out = tiny_model(images(2, 3, 64, 96), LABELS)
    assert out.logits.shape == (2, 4, 4, 6)
    assert out.pseudo.shape == (2, 64, 96) and out.pseudo.dtype == torch.long
    assert out.affinity.shape == (2, 24, 24)
    assert ((out.affinity > 0) & (out.affinity < 1)).all()


@pytest.mark.parametrize("refinement", ["none", "static", "rfm"])
def test_pseudo_labels_use_only_background_and_present_classes(tiny_model, refinement):
    out = tiny_model(images(2, 3, 64, 64), LABELS, refinement=refinement)
    first, second = (set(p.unique().tolist()) for p in out.pseudo)
    assert first <= {0, 1, 3} and second <= {0, 2}
    assert first & {1, 3} and 2 in second  # each image labels some of its classes


def test_inference_needs_no_labels_and_skips_the_cam_branch(tiny_model, monkeypatch):
    import weclip.model

    def fail(*args, **kwargs):
        raise AssertionError("CAM computed at inference")

    monkeypatch.setattr(weclip.model, "grad_cam", fail)
    out = tiny_model.eval()(images(1, 3, 64, 64))
    assert out.logits.shape == (1, 4, 4, 4) and out.pseudo is None and out.affinity is None


def test_cached_features_give_the_same_output_as_running_the_backbone(tiny_model):
    tiny_model.eval()
    x = images(2, 3, 64, 64)
    direct = tiny_model(x, LABELS)
    cached = tiny_model(x, LABELS, features=tiny_model.features(x))
    assert torch.equal(direct.logits, cached.logits) and torch.equal(direct.pseudo, cached.pseudo)


def test_unknown_refinement_is_refused(tiny_model):
    with pytest.raises(ValueError, match="refinement"):
        tiny_model(images(2, 3, 64, 64), LABELS, refinement="crf")


def test_layer_counts_follow_the_backbone_depth(tiny_model):
    assert tiny_model.backbone.depth == 4
    assert (tiny_model.static_layers, tiny_model.rfm_layers) == (3, 2)  # 8/12 and 6/12 of 4


def test_a_cam_layer_beyond_the_backbone_is_refused(tiny_model):
    from dataclasses import replace

    config = replace(tiny_model.config, cam_layer=-4)  # blocks 1..3 of 4 have tokens for it
    with pytest.raises(ValueError, match="cam_layer -4: must be between -3 and -1"):
        create_model(config, tiny_model.classes)


def test_training_step_updates_the_decoder_only(tiny_model):
    optimizer = build_optimizer(tiny_model, lr=1e-3)
    step = TrainStep(tiny_model, optimizer, poly_warmup(optimizer, 10, warmup_iters=0), radius=2)
    clip_before = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in tiny_model.decoder.state_dict().items()}
    result = step(Batch(images(2, 3, 64, 64), LABELS, torch.arange(2),
                        PresentClasses.from_labels(LABELS)))
    assert torch.isfinite(result["loss"])
    assert all(p.grad is None for p in tiny_model.backbone.parameters())
    assert all(torch.equal(v, clip_before[k]) for k, v in tiny_model.backbone.state_dict().items())
    changed = [not torch.equal(v, decoder_before[k]) for k, v in tiny_model.decoder.state_dict().items()]
    assert all(changed)


def test_training_reduces_the_loss_on_a_fixed_batch(tiny_model):
    torch.manual_seed(0)
    optimizer = build_optimizer(tiny_model, lr=2e-5)
    step = TrainStep(tiny_model, optimizer, radius=2)
    batch = Batch(images(2, 3, 64, 64), LABELS, torch.arange(2), PresentClasses.from_labels(LABELS))
    tiny_model.decoder.fusion.dropout.p = 0.0
    losses = [step(batch, refinement="static")["loss"].item() for _ in range(15)]
    assert losses[-1] < losses[0]


def test_a_model_file_rebuilds_the_model_from_any_folder(tiny_model, tmp_path, monkeypatch):
    torch.nn.init.normal_(tiny_model.decoder.head.classifier.weight)  # not the initial decoder
    path = save_model(tiny_model, tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    loaded = load_model(path)
    assert loaded.classes == tiny_model.classes and loaded.config == tiny_model.config
    x = images(1, 3, 64, 64)
    assert torch.equal(loaded(x).logits, tiny_model.eval()(x).logits)


def test_a_model_file_refuses_other_backbone_weights(tiny_model, tiny_arch, tmp_path):
    path = save_model(tiny_model, tmp_path / "model.pt")
    torch.manual_seed(1)
    other = create_model(tiny_model.config, tiny_model.classes).backbone.clip.state_dict()
    torch.nn.init.normal_(other["visual.conv1.weight"])
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not the one this model was trained on"):
        load_model(path, weights=str(tmp_path / "other.pt"))


@pytest.mark.parametrize("content", [b"not a torch file", "old"])
def test_foreign_and_old_model_files_are_refused_by_name(tiny_model, tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "old":  # what the train stage wrote before model files described themselves
        torch.save({"decoder": tiny_model.decoder.state_dict(), "classes": ["cat"]}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model.pt: not a WeCLIP model file"):
        load_model(path)
