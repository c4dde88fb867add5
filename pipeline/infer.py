"""The infer stage: segment a split with multi-scale + flip + DenseCRF (METHOD.md section 7).

For every image of ``infer.split`` it writes palette PNGs of three predictions, so that the
evaluate stage can score each variant: ``single/`` (scale 1.0, no flip), ``msf/`` (multi-scale +
flip) and ``crf/`` (multi-scale + flip + DenseCRF, the final prediction). The CRF runs in worker
processes, one image each. An image whose ``crf/`` PNG exists is skipped, so a rerun resumes.
"""
from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from weclip.crf import dense_crf
from weclip.dataset import EvalDataset, read_classes
from weclip.inference import predict

from .report import save_palette_png
from .params import params_fingerprint
from .train import build_model, resolve_device

VARIANTS = ("single", "msf", "crf")


def load_trained(params, model_path: str | Path, device):
    """The WeCLIP model of ``params`` with the decoder weights of ``model_path`` (train's model.pt)."""
    info = read_classes(params.dataset_dir)
    model = build_model(params, info)
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    model.decoder.load_state_dict(state["decoder"])
    return model.to(device).eval()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _crf_job(image: np.ndarray, probs: np.ndarray, crf: dict, path: Path) -> None:
    save_palette_png(dense_crf(image, probs, **crf).argmax(0).astype(np.uint8), path)


def infer(params, model_path: str | Path) -> Path:
    """Write the three predictions of every image of the split; returns the output folder."""
    p = params.infer
    out = Path(p.out)
    # Predictions of another model or other settings must not be resumed from.
    stamp = out / "fingerprint.txt"
    fingerprint = f"{_file_digest(Path(model_path))} {params_fingerprint(params, ('data', 'clip', 'model', 'infer'))}"
    if stamp.exists() and stamp.read_text() != fingerprint:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    for variant in VARIANTS:
        (out / variant).mkdir(parents=True, exist_ok=True)
    device = resolve_device(p.device)
    model = load_trained(params, model_path, device)
    data = EvalDataset(params.dataset_dir, p.split, params.clip.normalization)
    todo = [i for i, r in enumerate(data.records) if not (out / "crf" / f"{r.image_id}.png").exists()]
    crf = vars(p.crf)
    with ProcessPoolExecutor(max_workers=p.workers) as pool:
        jobs = []
        for i in tqdm(todo, desc=f"infer {p.split}", unit="image"):
            image, raw, _, _, _ = data[i]
            image_id = data.records[i].image_id
            image = image[None].to(device)
            single = predict(model, image, scales=(1.0,), flip=False, long_side=p.long_side)
            probs = predict(model, image, scales=p.scales, flip=p.flip, long_side=p.long_side)
            save_palette_png(single.argmax(1)[0].cpu().numpy().astype(np.uint8), out / "single" / f"{image_id}.png")
            probs = probs[0].cpu().numpy()
            save_palette_png(probs.argmax(0).astype(np.uint8), out / "msf" / f"{image_id}.png")
            rgb = raw.permute(1, 2, 0).numpy().astype(np.uint8)
            jobs.append(pool.submit(_crf_job, rgb, probs, crf, out / "crf" / f"{image_id}.png"))
            # Bound the queue: each job holds an image's probabilities.
            while sum(not j.done() for j in jobs) > 2 * p.workers:
                jobs[0].result()
                jobs = [j for j in jobs if not j.done()]
        for job in jobs:
            job.result()
    return out
