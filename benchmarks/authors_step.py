"""One training iteration of the WeCLIP authors' released VOC code, timed on random data.

Run by ``compare_authors.py`` with the Python of an environment that has the authors'
requirements (their repository's requirements.txt: numpy < 2, setuptools < 70, mmcv, ttach,
pydensecrf, opencv); nothing of their code is copied here, it is imported from ``--authors``.
Their code needs CUDA. Prints one JSON line: seconds per iteration and peak GPU memory.

What one iteration is, as their scripts/dist_clip_voc.py runs it: the model's forward
(frozen CLIP, Grad-CAM per present class, refinement, PAR, decoder), the affinity and
segmentation losses, backward and their PolyWarmupAdamW step. Their forward reads each image's
label PNG from <dataset_root>/SegmentationClassAug/<name>.png to know its classes; random ones
are written to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def radius_mask(size: int, radius: int) -> np.ndarray:
    """[size^2, size^2] 1 where two cells of a size x size grid are within ``radius``, as a
    numpy array like the one their script passes."""
    y, x = np.divmod(np.arange(size * size), size)
    near = (np.abs(y[:, None] - y[None]) <= radius) & (np.abs(x[:, None] - x[None]) <= radius)
    return near.astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, help="the WeCLIP repository's WeCLIP/ folder")
    parser.add_argument("--weights", required=True, help="CLIP ViT-B/16 state dict (OpenAI keys)")
    parser.add_argument("--labels", required=True, help="JSON: class ids (1..20) of each image")
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rfm", action="store_true", help="time the second half (RFM on)")
    args = parser.parse_args()
    sys.path.insert(0, args.authors)
    from utils.camutils import cams_to_affinity_label
    from utils.losses import get_aff_loss, get_seg_loss
    from utils.optimizer import PolyWarmupAdamW
    from WeCLIP_model.model_attn_aff_voc import WeCLIP

    labels = json.loads(Path(args.labels).read_text())
    root = Path(tempfile.mkdtemp())
    (root / "SegmentationClassAug").mkdir()
    names = [f"image{i}" for i in range(len(labels))]
    for name, classes in zip(names, labels):
        mask = np.zeros((args.crop, args.crop), np.uint8)
        for k, c in enumerate(classes):  # a band per class: the forward reads only the values
            mask[k * 20:(k + 1) * 20] = c
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{name}.png")

    model = WeCLIP(num_classes=21, clip_model=args.weights, embedding_dim=256,
                   in_channels=[768, 768, 768, 768], dataset_root_path=str(root), device="cuda")
    groups = model.get_param_groups()
    model.cuda().train()
    optimizer = PolyWarmupAdamW(
        params=[{"params": groups[0], "lr": 2e-4, "weight_decay": 0.01},
                {"params": groups[1], "lr": 0.0, "weight_decay": 0.0},
                {"params": groups[2], "lr": 2e-3, "weight_decay": 0.01},
                {"params": groups[3], "lr": 2e-3, "weight_decay": 0.01}],
        lr=2e-4, weight_decay=0.01, betas=(0.9, 0.999), warmup_iter=50, max_iter=30000,
        warmup_ratio=1e-6, power=1.0)
    if args.rfm:
        model.iter_num = 15001  # their switch counts forward passes
    mask = radius_mask(args.crop // 16, 8)
    images = torch.randn(len(names), 3, args.crop, args.crop).cuda()

    def step():
        segs, cams, attn_pred = model(images, names)
        segs = F.interpolate(segs, size=cams.shape[1:], mode="bilinear", align_corners=False)
        aff_label = cams_to_affinity_label(cams.clone(), mask=mask, ignore_index=255)
        attn_loss, _, _ = get_aff_loss(attn_pred, aff_label)
        seg_loss = get_seg_loss(segs, cams.type(torch.long), ignore_index=255)
        loss = seg_loss + 0.1 * attn_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(json.dumps({"step_s": (time.perf_counter() - start) / args.steps,
                      "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}))


if __name__ == "__main__":
    main()
