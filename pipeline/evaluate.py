"""The evaluate stage: mIoU of every step of the method, as tables, metrics and plots.

The ablation runs on ``evaluate.pseudo_split`` (VOC's own train list, as the paper scores it):
the initial Grad-CAM, the statically refined CAM, the RFM-refined CAM (each as background =
1 - max, argmax, no PAR), and the pseudo labels (RFM + PAR). The predictions of the infer stage
are scored on ``infer.split``: single scale, multi-scale + flip, and with DenseCRF (the final
result); with ``upper_bound.enabled``, also the single-scale prediction of the decoder trained
on masks.
``attention`` in diagnostics.json (beside metrics.json, which keeps the headline mIoUs only) says
how much of the backbone's attention stays within objects and within the background, which is
what the static and RFM refinements rely on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weclip.factory import load_model
from weclip.contract import read_classes
from weclip.dataset import EvalDataset
from weclip.images import load_mask
from weclip.metrics import confusion_matrix, mean_iou
from weclip.refine import transition_matrix

from . import distributed
from .scoring import score
from .stage import run_step
from .params import Params
from .report import (iou_table, split_metrics, write_charts, write_confusion, write_metrics,
                     write_per_class_iou, write_qualitative, write_tables, write_variant_iou)

CAM_STEPS = {"initial CAM": ("none", False), "static CAM": ("static", False),
             "RFM CAM": ("rfm", False), "pseudo labels (RFM + PAR)": ("rfm", True)}
PREDICTIONS = {"prediction": "single", "+ multi-scale + flip": "msf", "+ CRF": "crf"}


@torch.no_grad()
def cam_confusions(model, data: EvalDataset, device, limit: int | None = None) -> dict:
    """Confusion matrices of each step of CAM_STEPS over the first ``limit`` masked images."""
    model.eval()
    c = model.num_classes
    out = {name: torch.zeros(c, c, dtype=torch.long) for name in CAM_STEPS}
    for i in tqdm(data.with_masks(limit), desc="cam ablation", unit="image"):
        item = data[i]
        image, labels = item.image[None].to(device), item.labels[None]
        features = model.features(image)
        decoded = model(image, features=features, with_affinity=True)
        for name, (refinement, par) in CAM_STEPS.items():
            pseudo = model.pseudo_labels(image, labels, features, decoded.affinity, refinement,
                                         par, decoded.logits)[0].cpu()
            out[name] += confusion_matrix(pseudo, item.mask, c)
    return out


@torch.no_grad()
def attention_agreement(model, data: EvalDataset, device, limit: int | None = None) -> dict:
    """How much attention stays within a region, per block, for the static and RFM transition
    matrices, and for uniform attention ('uniform'), in percent (rows normalised):
    'foreground', the share of a foreground patch's attention on patches of its own
    ground-truth class; 'background', the share of a background patch's on background patches.

    Refinement can only help where the walks keep more than the uniform share.
    """
    model.eval()
    totals = {"foreground": {}, "background": {}}
    counts = dict.fromkeys(totals, 0)
    for i in data.with_masks(limit):
        item = data[i]
        image = item.image[None].to(device)
        features = model.features(image)
        h, w = features.grid
        cells = F.interpolate(item.mask[None, None].float(), size=(h, w), mode="nearest")
        cells = cells.flatten().long()
        cells = cells.to(device)
        valid = cells != data.info.ignore_index
        rows = {"foreground": valid & (cells > 0), "background": cells == 0}
        targets = {"foreground": (cells[:, None] == cells[None]).float(),
                   "background": (cells == 0).float().expand(len(cells), -1)}
        attn = features.attn[0, :, 1:, 1:].float()
        aff = model(image, features=features, with_affinity=True).affinity
        maps = {f"block {b + 1}": attn[b] for b in range(len(attn))}
        maps["static walk"] = transition_matrix(model.walk(features, aff, "static"))[0]
        maps["RFM walk"] = transition_matrix(model.walk(features, aff, "rfm"))[0]
        maps["uniform"] = torch.ones_like(attn[0])
        for side, chosen in rows.items():
            if not chosen.any():
                continue
            for name, m in maps.items():
                share = ((m / m.sum(-1, keepdim=True)) * targets[side]).sum(-1)[chosen].mean()
                totals[side][name] = totals[side].get(name, 0.0) + float(share)
            counts[side] += 1
    return {side: {name: round(100 * total / max(counts[side], 1), 1) for name, total in t.items()}
            for side, t in totals.items()}


def prediction_confusions(params: Params, data: EvalDataset, num_classes: int) -> dict:
    """Confusion matrices of the infer stage's PNGs against the masks of its split."""
    out = {}
    for name, variant in PREDICTIONS.items():
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for record in data.records:
            if record.mask:
                pred = load_mask(Path(params.infer.out) / variant / f"{record.image_id}.png")
                conf += confusion_matrix(pred, load_mask(record.mask), num_classes)
        out[name] = conf
    return out


def evaluate(params: Params, model_path: str | Path | None = None, step=run_step):
    """Write the reports under ``evaluate.out`` for ``model_path`` (default: train.out's
    model.pt); returns (metrics, per-class IoU table). ``step`` runs each scoring and the
    writing of the reports (``stage.run_step``)."""
    model_path = model_path or Path(params.train.out) / "model.pt"
    e, root = params.evaluate, params.dataset_dir
    info = read_classes(root)
    device = distributed.local_device(params.infer.device)
    model = load_model(model_path, device)
    val = EvalDataset(root, params.infer.split)
    train_data = EvalDataset(root, e.pseudo_split)
    cams = step("score CAM steps",
                lambda: cam_confusions(model, train_data, device, e.train_images),
                f"split {e.pseudo_split}")
    preds = step("score predictions",
                 lambda: prediction_confusions(params, val, info.num_classes),
                 f"split {params.infer.split}")
    if params.upper_bound.enabled:
        bound = load_model(Path(params.upper_bound.out) / "model.pt", device)
        preds["fully supervised"] = step(
            "score upper bound", lambda: score(bound, val, device, pseudo=False)["prediction"])
    attention = step("attention diagnostics",
                     lambda: attention_agreement(model, train_data, device, e.train_images))
    miou = {name: round(100 * mean_iou(conf), 2) for name, conf in {**cams, **preds}.items()}
    results = {"val": {"miou": miou["+ CRF"], "miou_no_crf": miou["+ multi-scale + flip"],
                       "miou_single_scale": miou["prediction"]},
               "train": {"pseudo_miou": miou["pseudo labels (RFM + PAR)"]},
               "ablation": miou, "attention": attention}
    table = iou_table({**cams, **preds}, info.classes)
    step("write reports", lambda: _write_reports(params, results, table, preds["+ CRF"], val))
    return results, table


def _write_reports(params: Params, results: dict, table, final_confusion: torch.Tensor,
                   val: EvalDataset) -> None:
    """Everything under ``evaluate.out``: tables, metrics, plot data, charts, the grid."""
    e, out = params.evaluate, Path(params.evaluate.out)
    classes = val.info.classes
    write_tables(table, out)
    write_per_class_iou(table, out / "per_class_iou.csv")
    write_variant_iou(table, "+ CRF", out / "per_class_iou_final.csv")
    write_confusion(final_confusion, classes, out / "confusion.csv")
    headline, diagnostics = split_metrics(results)
    write_metrics(headline, out / "metrics.json")  # the DVC metric
    write_metrics(diagnostics, out / "diagnostics.json")  # an output, not a metric
    write_charts(table, "+ CRF", Path(params.train.out), out)
    samples = []
    for i in val.with_masks(e.qualitative):
        item = val[i]
        pred = load_mask(Path(params.infer.out) / "crf" / f"{item.image_id}.png")
        samples.append((np.asarray(item.image.permute(1, 2, 0), np.uint8), item.mask.numpy(),
                        pred.numpy(), item.image_id))
    write_qualitative(samples, out / "qualitative.png", class_names=classes)
