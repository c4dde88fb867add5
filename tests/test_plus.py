"""WeCLIP+: the frozen DINOv2 beside the frozen CLIP, its decoder, pseudo labels and losses, and
its model file (docs/method.md, section 10)."""
import pytest
import torch
import torch.nn.functional as F

from weclip import load_model, predict, save_model
from weclip.batch import Batch, PresentClasses
from weclip.dino import FrozenDINO, create_dino
from weclip.losses import dice_loss
from weclip.optim import build_optimizer
from weclip.training import TrainStep

LABELS = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()


def images(*shape):
    torch.manual_seed(0)
    return torch.rand(*shape) * 255


def test_the_dino_gives_timms_patch_tokens_at_its_own_grid(tiny_dino_arch, tiny_dino_weights):
    dino = FrozenDINO(create_dino(tiny_dino_arch, str(tiny_dino_weights)))
    x = torch.randn(2, 3, 56, 56)  # the 4 x 4 grid its positions were learned on
    tokens, grid = dino(x)
    expected = dino.vit.forward_features(x)[:, dino.vit.num_prefix_tokens:]
    assert grid == (4, 4) and torch.allclose(tokens, expected, atol=1e-6)


def test_the_dino_resamples_its_positions_as_the_hub_model_does(tiny_dino_arch):
    """Bicubic by a scale factor (grid + 0.1) / 4, no antialiasing: not timm's own resampling."""
    dino = FrozenDINO(create_dino(tiny_dino_arch, None))
    x = torch.randn(1, 3, 100, 72)  # resized to 98 x 70: a 7 x 5 grid
    tokens, grid = dino(x)
    v = dino.vit
    patches = v.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=(7.1 / 4, 5.1 / 4), mode="bicubic",
                            align_corners=False).flatten(2).transpose(1, 2)
    h = v.patch_embed(F.interpolate(x, size=(98, 70), mode="bilinear"))
    h = torch.cat([v.cls_token, h.reshape(1, 35, -1)], 1) + torch.cat([v.pos_embed[:, :1], patches], 1)
    expected = v.norm(v.blocks(h))[:, 1:]
    assert grid == (7, 5) and torch.allclose(tokens, expected, atol=1e-5)
    assert not torch.allclose(tokens, v.forward_features(F.interpolate(
        x, size=(98, 70), mode="bilinear"))[:, 1:], atol=1e-3)  # timm's resampling differs


def test_a_weight_file_of_another_model_is_named(tiny_dino_arch, tmp_path):
    torch.save({"blocks.0.norm1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth: weights do not fit"):
        create_dino(tiny_dino_arch, str(tmp_path / "wrong.pth"))


def test_the_forward_averages_the_two_branches_and_labels_present_classes(tiny_plus_model):
    out = tiny_plus_model(images(2, 3, 64, 96), LABELS)
    clip, dino = out.branches
    assert clip.shape == dino.shape == out.logits.shape == (2, 4, 4, 6)
    assert torch.allclose(out.logits, 0.5 * clip + 0.5 * dino)
    assert out.affinity.shape == (2, 24, 24)
    first, second = (set(p.unique().tolist()) for p in out.pseudo)
    assert first <= {0, 1, 3} and second <= {0, 2}


def test_cams_are_scaled_by_the_detached_prediction_at_their_class(tiny_plus_model):
    model = tiny_plus_model.eval()
    x = images(2, 3, 64, 64)
    features = model.features(x)
    logits = model(x, features=features).logits
    pairs = PresentClasses.from_labels(LABELS)
    scale = model.cam_scale(logits, features, pairs)
    probs = logits.softmax(1)
    assert torch.allclose(scale[0, 1], probs[0, 3]) and torch.allclose(scale[1, 0], probs[1, 2])


def test_both_branches_and_the_shared_head_learn_from_every_loss(tiny_plus_model):
    model = tiny_plus_model
    step = TrainStep(model, build_optimizer(model, lr=1e-3), radius=2, dice_weight=1.0,
                     cross_weight=0.1)
    batch = Batch(images(2, 3, 64, 64), LABELS, torch.arange(2), PresentClasses.from_labels(LABELS))
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    result = step(batch, self_training=True)
    assert torch.isfinite(result["loss"])
    for part in ("clip", "dino", "head"):
        changed = [not torch.equal(v, before[k]) for k, v in model.decoder.state_dict().items()
                   if k.startswith(part + ".")]
        assert changed and all(changed), part
    assert all(p.grad is None for p in [*model.backbone.parameters(), *model.dino.parameters()])


def test_the_dice_loss_of_a_batch_and_of_its_shares():
    logits = torch.randn(4, 3, 5, 5, requires_grad=True)
    labels = torch.randint(0, 3, (4, 5, 5))
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    expected = 1 - (2 * (probs * onehot).sum((0, 2, 3)) / (probs + onehot).sum((0, 2, 3))).mean()
    assert torch.allclose(dice_loss(logits, labels), expected)
    # Two shares of the batch, each with the other's sums (what an all-reduce gives a rank):
    # the same value, and gradients that add up to the whole batch's.
    whole, = torch.autograd.grad(dice_loss(logits, labels), logits)
    shares = []
    for mine, other in ((slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):
        share = dice_loss(logits[mine], labels[mine],
                          sum_counts=_summed_with(logits[other], labels[other]))
        assert torch.allclose(share, expected)
        shares.append(torch.autograd.grad(share, logits)[0])
    assert torch.allclose(shares[0] + shares[1], whole, atol=1e-6)


def _summed_with(logits, labels):
    """A sum over 'ranks': this share's sums plus those of ``logits``/``labels``, in the order
    dice_loss asks for them (the overlap, then the total)."""
    probs = logits.detach().softmax(1)
    onehot = F.one_hot(labels, probs.shape[1]).permute(0, 3, 1, 2).float()
    others = iter([(probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))])
    return lambda local: local + next(others)


def test_a_weclip_plus_model_file_round_trips_and_predicts(tiny_plus_model, tmp_path,
                                                           monkeypatch):
    torch.nn.init.normal_(tiny_plus_model.decoder.head.classifier.weight)
    path = save_model(tiny_plus_model, tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    loaded = load_model(path)
    assert loaded.config == tiny_plus_model.config
    x = images(1, 3, 64, 64)
    assert torch.equal(loaded(x).logits, tiny_plus_model.eval()(x).logits)
    assert predict(loaded, x, long_side=64).shape == (1, 4, 64, 64)


def test_a_model_file_refuses_other_dino_weights(tiny_plus_model, tiny_dino_arch, tmp_path):
    path = save_model(tiny_plus_model, tmp_path / "model.pt")
    other = create_dino(tiny_dino_arch, None).state_dict()
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="the frozen DINO .* is not the one this model was trained"):
        load_model(path, dino_weights=str(tmp_path / "other.pth"))
