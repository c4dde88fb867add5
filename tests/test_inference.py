"""Multi-scale + flip inference and DenseCRF (docs/method.md, section 7)."""
import numpy as np
import pytest
import torch

from weclip.crf import dense_crf
from weclip.inference import predict, resize_long_side


def test_resize_long_side_truncates_the_short_side():
    assert resize_long_side(torch.zeros(1, 3, 375, 500), 512).shape[-2:] == (384, 512)


def test_prediction_is_a_distribution_at_the_input_size(tiny_model):
    probs = predict(tiny_model.eval(), torch.randn(2, 3, 70, 90), long_side=128)
    assert probs.shape == (2, 4, 70, 90)
    assert torch.allclose(probs.sum(1), torch.ones(2, 70, 90), atol=1e-5)


def test_flip_averaging_makes_predictions_mirror_symmetric(tiny_model):
    tiny_model.eval()
    image = torch.randn(1, 3, 64, 96)
    probs = predict(tiny_model, image, long_side=None)
    mirrored = predict(tiny_model, image.flip(-1), long_side=None)
    assert torch.allclose(probs.flip(-1), mirrored, atol=1e-5)


def test_single_scale_without_flip_is_the_plain_forward(tiny_model):
    tiny_model.eval()
    image = torch.randn(1, 3, 64, 64)
    probs = predict(tiny_model, image, scales=(1.0,), flip=False, long_side=None)
    logits = torch.nn.functional.interpolate(tiny_model(image).logits, size=(64, 64),
                                             mode="bilinear", align_corners=False)
    assert torch.allclose(probs, logits.softmax(1), atol=1e-6)


def test_dense_crf_snaps_uncertain_probabilities_to_image_edges():
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255
    truth = np.zeros((40, 40), int); truth[:, 20:] = 1
    probs = np.full((2, 40, 40), 0.5, np.float32)
    probs[1, :, 24:], probs[0, :, 24:] = 0.7, 0.3  # confident away from the edge,
    probs[0, :, :16], probs[1, :, :16] = 0.7, 0.3  # undecided near it
    refined = dense_crf(image, probs)
    assert refined.shape == (2, 40, 40)
    assert np.allclose(refined.sum(0), 1, atol=1e-4)
    assert (refined.argmax(0) == truth).mean() > 0.98


def test_dense_crf_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="image"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 5, 5), 0.5, np.float32))
