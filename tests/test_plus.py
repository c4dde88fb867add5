"""WeCLIP+: the frozen DINOv2 beside the frozen CLIP, its decoder, pseudo labels and losses, and
its model file (docs/method.md, section 10)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

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


@pytest.mark.slow
def test_the_world_plus_recipe_runs_every_stage_on_a_tiny_world(tmp_path):
    """The recipe as shipped (the small CLIP and small DINO of weclip/pretrained), on a world of
    6 scenes at 64 px and 4 iterations that cross the self-training switch."""
    from pipeline.evaluate import evaluate
    from pipeline.infer import infer
    from pipeline.params import RECIPES, load_params
    from pipeline.prepare import prepare
    from pipeline.train import train
    from weclip import WeCLIPPlus

    params = load_params(RECIPES / "world-plus.yaml", {
        "data.out": str(tmp_path / "data"), "data.world.image_size": 64,
        "data.world.n_train": 4, "data.world.n_val": 2,
        "train.out": str(tmp_path / "run"), "train.iters": 4, "train.self_training_start": 2,
        "train.batch_size": 2, "train.crop_size": 64, "train.workers": 0,
        "train.log_every": 1, "train.checkpoint_every": 2, "train.eval_every": 4,
        "train.eval_images": 2, "model.par_iters": 2,
        "infer.out": str(tmp_path / "infer"), "infer.long_side": 64, "infer.workers": 1,
        "evaluate.out": str(tmp_path / "reports"), "evaluate.train_images": 2,
        "evaluate.qualitative": 1, "upper_bound.enabled": False})
    prepare(params)
    model = train(params)
    assert isinstance(load_model(model), WeCLIPPlus)
    infer(params, model)
    assert len(list((tmp_path / "infer" / "crf").glob("*.png"))) == 2
    metrics, table = evaluate(params, model)
    assert list(table.index)[-1] == "mIoU" and 0 <= metrics["val"]["miou"] <= 100
    # The shipped small models localise: labelling every pixel background scores under 20 here.
    assert metrics["train"]["pseudo_miou"] > 30


def scene(rng, klass: int, size=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey image with one coloured rectangle, and its mask of ``klass``."""
    image = rng.integers(100, 140, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, np.uint8)
    y, x = rng.integers(0, 16, 2)
    image[y:y + 28, x:x + 36] = (40 * (klass % 6), 200, 37 * klass % 256)
    mask[y:y + 28, x:x + 36] = klass
    return image, mask


def voc_devkit(root: Path) -> dict:
    """A VOC2012 folder with SegmentationClassAug: 4 train_aug and 2 val images."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for i, klass in enumerate([15, 8, 12, 15, 8, 12]):
        image, mask = scene(rng, klass)
        Image.fromarray(image).save(root / "JPEGImages" / f"2007_{i:06d}.jpg")
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"2007_{i:06d}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000000\n2007_000001\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000004\n2007_000005\n")
    return {"root": str(root)}


def coco_copy(root: Path) -> dict:
    """A VOC-style COCO 2014 copy: 4 train and 2 val images with their class masks."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (root / "JPEGImages" / split).mkdir(parents=True)
        (root / "SegmentationClass" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = scene(rng, [1, 18, 62][i % 3])
            Image.fromarray(image).save(root / "JPEGImages" / split / f"COCO_{split}2014_{i:012d}.jpg")
            Image.fromarray(mask).save(root / "SegmentationClass" / split / f"{i:012d}.png")
    return {"root": str(root)}


@pytest.mark.slow
@pytest.mark.parametrize("recipe, source", [("voc-plus", voc_devkit), ("coco-plus", coco_copy)])
def test_the_voc_and_coco_plus_recipes_run_on_small_local_data(recipe, source, tmp_path, tiny_arch,
                                                                tiny_clip_weights, tiny_dino_arch,
                                                                tiny_dino_weights):
    """Each recipe as shipped, with its dataset read from a local folder, the tiny CLIP and
    DINOv2 in place of ViT-B/16 and ViT-S/14, and the run shrunk to 4 iterations at crop 56
    that cross the self-training switch."""
    from pipeline.evaluate import evaluate
    from pipeline.infer import infer
    from pipeline.params import RECIPES, load_params
    from pipeline.prepare import prepare
    from pipeline.train import train
    from weclip import WeCLIPPlus

    dataset = recipe.removesuffix("-plus")
    params = load_params(RECIPES / f"{recipe}.yaml", {
        f"data.{dataset}": source(tmp_path / "source"), "data.out": str(tmp_path / "data"),
        "model.weights": str(tiny_clip_weights), "model.arch": tiny_arch,
        "model.dino": {"arch": tiny_dino_arch, "weights": str(tiny_dino_weights)},
        "model.decoder_dim": 32, "model.par_iters": 2,
        "train.out": str(tmp_path / "run"), "train.iters": 4, "train.self_training_start": 2,
        "train.batch_size": 2, "train.crop_size": 56, "train.workers": 0, "train.log_every": 1,
        "train.checkpoint_every": 2, "train.eval_every": 4, "train.eval_images": 2,
        "train.warmup_iters": 1, "infer.out": str(tmp_path / "infer"), "infer.long_side": 64,
        "infer.workers": 1, "evaluate.out": str(tmp_path / "reports"),
        "evaluate.train_images": 2, "evaluate.qualitative": 1, "upper_bound.enabled": False})
    prepare(params)
    model = train(params)
    trained = load_model(model)
    assert isinstance(trained, WeCLIPPlus) and trained.config == params.model
    assert len(trained.classes.classes) == {"voc": 20, "coco": 80}[dataset]
    infer(params, model)
    final = "crf" if params.infer.crf.iterations else "msf"  # COCO's recipe runs no CRF
    assert len(list((tmp_path / "infer" / final).glob("*.png"))) == 2
    metrics, table = evaluate(params, model)
    assert set(metrics) >= {"val", "train"} and list(table.index)[-1] == "mIoU"
