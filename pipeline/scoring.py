"""Scoring a model on a split: the confusion matrices of its pseudo labels and predictions (the
train stage's periodic evaluation, the evaluate stage's upper bound)."""
from __future__ import annotations

import torch

from weclip.dataset import EvalDataset
from weclip.inference import predict
from weclip.metrics import confusion_matrix


@torch.no_grad()
def score(model, dataset: EvalDataset, device, limit: int | None = None,
          pseudo: bool = True, prediction: bool = True) -> dict[str, torch.Tensor]:
    """Confusion matrices [C+1, C+1] of the pseudo labels (RFM + PAR, from the image labels) and
    of the single-scale prediction over the first ``limit`` images of ``dataset`` with masks."""
    model.eval()
    c = model.num_classes
    out = {k: torch.zeros(c, c, dtype=torch.long) for k, on in
           (("pseudo", pseudo), ("prediction", prediction)) if on}
    for i in dataset.with_masks(limit):
        item = dataset[i]
        image = item.image[None].to(device)
        if pseudo:
            labels = model(image, item.labels[None]).pseudo[0].cpu()
            out["pseudo"] += confusion_matrix(labels, item.mask, c)
        if prediction:
            probs = predict(model, image, scales=(1.0,), flip=False, long_side=None)
            out["prediction"] += confusion_matrix(probs.argmax(1)[0].cpu(), item.mask, c)
    return out
