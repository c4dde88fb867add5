"""The infer stage: segment a split with multi-scale + flip + DenseCRF (METHOD.md section 7).

For every image of ``infer.split`` it writes palette PNGs of three predictions, so that the
evaluate stage can score each variant: ``single/`` (scale 1.0, no flip), ``msf/`` (multi-scale +
flip) and ``crf/`` (multi-scale + flip + DenseCRF, the final prediction). The CRF runs in worker
processes, one image each. An image whose ``crf/`` PNG exists is skipped, so a rerun resumes.
With ``infer.export_pseudo`` it also writes the online pseudo labels (RFM + PAR) of the train
split to ``pseudo/``, VOC-style, for training a second-stage segmenter.
``predict`` segments image files outside any dataset.
"""
from __future__ import annotations

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
from .params import file_digest, params_fingerprint
from .train import build_model, resolve_device

VARIANTS = ("single", "msf", "crf")


def load_trained(params, model_path: str | Path, device):
    """The WeCLIP model of ``params`` with the decoder weights of ``model_path`` (train's model.pt)."""
    info = read_classes(params.dataset_dir)
    model = build_model(params, info)
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    model.decoder.load_state_dict(state["decoder"])
    return model.to(device).eval()


def _crf_job(image: np.ndarray, probs: np.ndarray, crf: dict, path: Path) -> None:
    save_palette_png(dense_crf(image, probs, **crf).argmax(0).astype(np.uint8), path)


def infer(params, model_path: str | Path) -> Path:
    """Write the three predictions of every image of the split; returns the output folder."""
    p = params.infer
    out = Path(p.out)
    # Predictions of another model or other settings must not be resumed from.
    stamp = out / "fingerprint.txt"
    fingerprint = f"{file_digest(model_path)} {params_fingerprint(params, ('data', 'clip', 'model', 'infer'))}"
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
    with ProcessPoolExecutor(max_workers=p.workers) as pool:
        jobs = []
        for i in tqdm(todo, desc=f"infer {p.split}", unit="image"):
            image, raw, _, _, _ = data[i]
            name = f"{data.records[i].image_id}.png"
            single, probs = segment(model, image[None].to(device), p)
            save_palette_png(single, out / "single" / name)
            save_palette_png(probs.argmax(0).astype(np.uint8), out / "msf" / name)
            jobs.append(pool.submit(_crf_job, _rgb(raw), probs, vars(p.crf), out / "crf" / name))
            # Bound the queue: each job holds an image's probabilities.
            while sum(not j.done() for j in jobs) > 2 * p.workers:
                jobs[0].result()
                jobs = [j for j in jobs if not j.done()]
        for job in jobs:
            job.result()
    if p.export_pseudo:
        export_pseudo_labels(model, EvalDataset(params.dataset_dir, params.train.split,
                                                params.clip.normalization), out / "pseudo", device)
    return out


def _rgb(raw: torch.Tensor) -> np.ndarray:
    """[3, H, W] 0-255 float -> uint8 [H, W, 3]."""
    return raw.permute(1, 2, 0).numpy().astype(np.uint8)


@torch.no_grad()
def segment(model, image: torch.Tensor, p) -> tuple[np.ndarray, np.ndarray]:
    """One normalised image [1, 3, H, W] -> (single-scale labels uint8 [H, W],
    multi-scale + flip probabilities float32 [C, H, W])."""
    single = predict(model, image, scales=(1.0,), flip=False, long_side=p.long_side)
    probs = predict(model, image, scales=p.scales, flip=p.flip, long_side=p.long_side)
    return single.argmax(1)[0].cpu().numpy().astype(np.uint8), probs[0].cpu().numpy()


@torch.no_grad()
def export_pseudo_labels(model, data: EvalDataset, out: Path, device) -> Path:
    """The RFM + PAR pseudo label of every image of ``data`` as a palette PNG (resumable)."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i, r in enumerate(data.records) if not (out / f"{r.image_id}.png").exists()]
    for i in tqdm(todo, desc="pseudo labels", unit="image"):
        image, _, _, labels, _ = data[i]
        pseudo = model(image[None].to(device), labels[None]).pseudo[0]
        save_palette_png(pseudo.cpu().numpy().astype(np.uint8), out / f"{data.records[i].image_id}.png")
    return out


def predict_files(params, model_path: str | Path, images: list[Path], out: Path) -> list[Path]:
    """Segment image files: ``out``/<stem>.png (palette mask) and <stem>_overlay.png each."""
    from weclip.dataset import load_image, normalize

    from .report import overlay, write_image

    device = resolve_device(params.infer.device)
    model = load_trained(params, model_path, device)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(images, desc="predict", unit="image"):
        try:
            raw = load_image(path)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the image ({e})") from None
        _, probs = segment(model, normalize(raw, params.clip.normalization)[None].to(device),
                           params.infer)
        labels = dense_crf(_rgb(raw), probs, **vars(params.infer.crf)).argmax(0).astype(np.uint8)
        written.append(save_palette_png(labels, out / f"{path.stem}.png"))
        write_image(overlay(_rgb(raw), labels), out / f"{path.stem}_overlay.png")
    return written
