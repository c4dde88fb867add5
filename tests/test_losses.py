"""Segmentation and affinity losses (docs/method.md, section 6)."""
import torch
import torch.nn.functional as F

from weclip.losses import affinity_labels, affinity_loss, radius_mask, seg_loss


def test_seg_loss_averages_background_and_foreground_cross_entropy():
    logits = torch.randn(2, 4, 6, 6)
    labels = torch.randint(0, 4, (2, 6, 6))
    labels[0, 0, :3] = 255
    bg = labels.clone(); bg[labels != 0] = 255
    fg = labels.clone(); fg[labels == 0] = 255
    expected = 0.5 * (F.cross_entropy(logits, bg, ignore_index=255)
                      + F.cross_entropy(logits, fg, ignore_index=255))
    assert torch.allclose(seg_loss(logits, labels), expected)


def test_seg_loss_without_foreground_pixels_is_half_the_background_cross_entropy():
    logits, labels = torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    assert torch.allclose(seg_loss(logits, labels), 0.5 * F.cross_entropy(logits, labels))


def test_radius_mask_is_a_chebyshev_window():
    mask = radius_mask(5, 7, radius=2)
    assert mask.shape == (35, 35) and torch.equal(mask, mask.T)
    centre = mask[2 * 7 + 3].view(5, 7)
    expected = torch.zeros(5, 7); expected[0:5, 1:6] = 1
    assert torch.equal(centre, expected)


def test_affinity_labels_mark_agreeing_pairs_and_ignore_far_and_unlabelled_pairs():
    pseudo = torch.zeros(1, 64, 64, dtype=torch.long)  # a 4x4 grid at patch 16
    pseudo[:, :, 32:] = 1
    pseudo[:, 48:, :16] = 255  # grid cell (3, 0) ignored
    mask = radius_mask(4, 4, radius=1)
    labels = affinity_labels(pseudo, mask, patch=16)[0]
    cell = lambda y, x: 4 * y + x
    assert labels[cell(0, 0), cell(0, 1)] == 1  # same class, neighbours
    assert labels[cell(0, 1), cell(0, 2)] == 0  # different classes, neighbours
    assert labels[cell(0, 0), cell(0, 3)] == 255  # beyond the radius
    assert (labels[cell(3, 0)] == 255).all() and (labels[:, cell(3, 0)] == 255).all()


def test_affinity_loss_weights_positive_and_negative_pairs_equally():
    pred = torch.tensor([[[0.9, 0.2], [0.4, 0.7]]])
    labels = torch.tensor([[[1, 0], [255, 1]]])
    expected = 0.5 * ((0.1 + 0.3) / 3) + 0.5 * (0.2 / 2)
    assert torch.allclose(affinity_loss(pred, labels), torch.tensor(expected))
