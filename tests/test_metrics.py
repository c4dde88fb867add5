"""Confusion matrix and IoU (docs/method.md, section 7)."""
import math

import torch

from weclip.metrics import confusion_matrix, iou, mean_iou


def test_confusion_matrix_counts_truth_by_prediction_and_skips_ignored_pixels():
    truth = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = confusion_matrix(pred, truth, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_iou_per_class_and_mean_over_present_classes():
    conf = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    values = iou(conf)
    assert values[:3].tolist() == [1 / 3, 2 / 3, 0.0] and math.isnan(values[3])
    assert math.isclose(mean_iou(conf), 1 / 3)


def test_the_mean_leaves_out_classes_absent_from_the_ground_truth_as_the_reference_does():
    conf = torch.tensor([[3, 1], [0, 0]])  # class 1 only predicted: IoU 0, not in the mean
    assert iou(conf).tolist() == [0.75, 0.0]
    assert mean_iou(conf) == 0.75


def test_confusion_matrices_add_up_over_images():
    a, b = torch.randint(0, 3, (2, 5, 5)), torch.randint(0, 3, (2, 5, 5))
    total = confusion_matrix(a[0], b[0], 3) + confusion_matrix(a[1], b[1], 3)
    assert torch.equal(total, confusion_matrix(a, b, 3))
