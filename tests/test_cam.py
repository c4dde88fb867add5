"""Grad-CAM over (image, class) pairs and the box mask (docs/method.md, sections 4-5)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from weclip.batch import PresentClasses
from weclip.cam import box_mask, grad_cam, min_max


def reference_box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """The specification, one map at a time: boxes of 8-connected regions, end clipped."""
    h, w = cam.shape
    q = (cam * 255).astype(np.uint8)
    regions, count = ndimage.label(q > int(threshold * q.max()), structure=np.ones((3, 3)))
    mask = np.zeros((h, w), np.float32)
    for ys, xs in ndimage.find_objects(regions):
        mask[ys.start:min(ys.stop, h - 1), xs.start:min(xs.stop, w - 1)] = 1
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_box_mask_matches_per_region_boxes_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    cams = rng.random((6, 13, 17)).astype(np.float32) ** 3
    out = box_mask(torch.from_numpy(cams), threshold=0.4).numpy()
    for cam, mask in zip(cams, out):
        np.testing.assert_array_equal(mask, reference_box_mask(cam, 0.4))


def test_box_mask_border_quirk_drops_last_row_and_column():
    cam = torch.zeros(6, 6)
    cam[3:, 3:] = 1.0  # a region touching the right and bottom borders
    cam[0, 0] = 1.0  # a single pixel in the corner: its box [0, 1) x [0, 1) survives
    mask = box_mask(cam)
    expected = torch.zeros(6, 6)
    expected[3:5, 3:5] = 1
    expected[0, 0] = 1
    assert torch.equal(mask, expected)


def test_box_mask_boxes_each_region_not_their_union():
    cam = torch.zeros(8, 8)
    cam[1, 1] = cam[2, 2] = 1.0  # diagonal neighbours: one 8-connected region
    cam[5, 5] = 1.0
    mask = box_mask(cam)
    assert mask.sum() == 4 + 1
    assert mask[1:3, 1:3].all() and mask[5, 5] == 1


def test_box_mask_is_empty_for_an_all_zero_cam():
    assert box_mask(torch.zeros(2, 5, 5)).sum() == 0


def test_box_mask_threshold_is_strictly_above_the_truncated_fraction_of_the_max():
    cam = torch.zeros(3, 5)
    cam[1] = torch.tensor([1.0, 0.4, 0.41, 0.0, 0.0])  # uint8 255, 102, 104; threshold int(102.0)
    expected = torch.zeros(3, 5)
    expected[1] = torch.tensor([1.0, 0, 1, 0, 0])
    assert torch.equal(box_mask(cam, threshold=0.4), expected)


def test_present_classes_lay_out_each_images_classes_in_fixed_slots():
    pairs = PresentClasses.from_labels(torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]), slots=3)
    assert pairs.classes.tolist() == [[1, 2, 0], [0, 0, 0]]
    assert pairs.valid.tolist() == [[True, True, False], [True, False, False]]
    assert pairs.present.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert PresentClasses.from_labels(torch.tensor([[0, 1, 1], [1, 0, 0]])).classes.shape == (2, 2)


def test_slots_may_exceed_the_number_of_classes():
    pairs = PresentClasses.from_labels(torch.tensor([[1, 1]]), slots=4)
    assert pairs.classes.tolist() == [[0, 1, 0, 0]]
    assert pairs.valid.tolist() == [[True, True, False, False]]


def test_an_image_without_labels_or_with_more_labels_than_slots_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        PresentClasses.from_labels(torch.tensor([[0, 1], [0, 0]]))
    with pytest.raises(ValueError, match="3 class labels, more than the 2 slots"):
        PresentClasses.from_labels(torch.tensor([[1, 1, 1]]), slots=2)


def test_min_max_scales_each_map_to_unit_range():
    x = min_max(torch.rand(3, 4, 5) * 7 - 2)
    assert torch.allclose(x.amin((1, 2)), torch.zeros(3))
    assert torch.allclose(x.amax((1, 2)), torch.ones(3), atol=1e-6)


def per_class_grad_cam(backbone, tokens, grid, labels, fg_text, bg_text):
    """The specification: one backward pass per (image, class), text set = present fg + bg."""
    cams = []
    block = backbone.visual.transformer.resblocks[-1]
    for i, row in enumerate(labels):
        present = row.nonzero().flatten()
        text = torch.cat([fg_text[present], bg_text])
        for j in range(len(present)):
            h = block.ln_1(tokens[i:i + 1]).detach().requires_grad_(True)
            score = backbone.last_block_scores(tokens[i:i + 1], h, text).softmax(-1)[0, j]
            grad, = torch.autograd.grad(score, h)
            weights = grad[0, 1:].mean(0)
            cam = (h[0, 1:].detach() * weights).sum(-1).relu().view(grid)
            cams.append(min_max(min_max(cam)))  # scaled twice, as the reference's library
    return torch.stack(cams)


def test_batched_grad_cam_equals_one_backward_per_class(tiny_model):
    images = torch.randn(3, 3, 64, 80)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]]).float()
    feats = tiny_model.backbone(images)
    pairs = PresentClasses.from_labels(labels)
    args = (feats.tokens[:, -1], feats.grid)
    batched = grad_cam(tiny_model.backbone, *args, pairs, tiny_model.fg_text, tiny_model.bg_text)
    expected = per_class_grad_cam(tiny_model.backbone, *args, labels, tiny_model.fg_text, tiny_model.bg_text)
    assert torch.allclose(batched[pairs.valid], expected, atol=1e-5)
    assert (batched[~pairs.valid] == 0).all()  # padding slots


def test_grad_cams_peak_at_one_as_the_reference_scales_them_twice(tiny_model):
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()
    feats = tiny_model.backbone(images)
    pairs = PresentClasses.from_labels(labels)
    cams = grad_cam(tiny_model.backbone, feats.tokens[:, -1], feats.grid, pairs,
                    tiny_model.fg_text, tiny_model.bg_text)[pairs.valid]
    peaks = cams.amax((-2, -1))
    assert ((1 - peaks) < 1e-6).all() and (cams.amin((-2, -1)) == 0).all()


def test_cams_of_a_batch_equal_the_cams_of_each_image_alone(tiny_model):
    tiny_model.eval()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]]).float()
    feats = tiny_model.backbone(images)
    out = tiny_model.decoder(feats.tokens[:, :, 1:], feats.grid)[1]
    from weclip.decoder import affinity
    pairs = PresentClasses.from_labels(labels)
    batch = tiny_model.cams(images, pairs, feats, affinity(out))[pairs.valid]
    alone = []
    for i in range(2):
        f = tiny_model.backbone(images[i:i + 1])
        a = affinity(tiny_model.decoder(f.tokens[:, :, 1:], f.grid)[1])
        one = PresentClasses.from_labels(labels[i:i + 1])
        alone.append(tiny_model.cams(images[i:i + 1], one, f, a)[one.valid])
    # Batched matmuls round differently (up to 3e-5 after the min-max scaling, torch 2.15);
    # mixing images up would differ by tenths.
    assert torch.allclose(batch, torch.cat(alone), atol=1e-4)
