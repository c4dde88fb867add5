"""DenseCRF post-processing through pydensecrf (docs/method.md, section 7)."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, pos_sxy: float = 3,
              pos_compat: float = 3, bi_sxy: float = 64, bi_srgb: float = 5,
              bi_compat: float = 4) -> np.ndarray:
    """Refine class probabilities along the image's edges.

    image: uint8 [H, W, 3] RGB; probs: float [C, H, W] summing to 1 over C.
    Returns float32 [C, H, W] marginals.
    """
    c, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image is {image.shape[:2]} but probabilities are {(h, w)}")
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=pos_sxy, compat=pos_compat)
    crf.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, compat=bi_compat,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(c, h, w)
