"""The infer stage: segment a split with multi-scale + flip + DenseCRF (docs/method.md, section 7).

For every image of ``infer.split`` it writes palette PNGs of three predictions, so that the
evaluate stage can score each variant: ``single/`` (scale 1.0, no flip), ``msf/`` (multi-scale +
flip) and ``crf/`` (multi-scale + flip + DenseCRF, the final prediction). The CRF runs in worker
processes, one image each. An image whose ``crf/`` PNG exists is skipped, so a rerun resumes.
With ``infer.export_pseudo`` it also writes the online pseudo labels (RFM + PAR) of the train
split to ``pseudo/``, VOC-style, for training a second-stage segmenter. Under torchrun each rank
segments every N-th image; every output is per image, so no two ranks write the same file.
``predict_files`` segments image files outside any dataset.
"""
from __future__ import annotations

import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from weclip.crf import dense_crf
from weclip.dataset import EvalDataset
from weclip.factory import load_model
from weclip.files import file_digest
from weclip.images import load_image, overlay, save_label_map, write_image
from weclip.inference import predict

from . import distributed
from .orphans import die_with_parent, forkserver
from .params import InferParams, Params, params_fingerprint
from .stage import Run, Stopped, discard_stale, run_step, stage

VARIANTS = ("single", "msf", "crf")
# Images per step (``stage.run_step``): a Prefect task each, few enough to read in the UI.
CHUNK = 100


def _crf_job(image: np.ndarray, probs: np.ndarray, crf: dict, path: Path) -> None:
    save_label_map(dense_crf(image, probs, **crf).argmax(0).astype(np.uint8), path)


def infer(params: Params, model_path: str | Path | None = None, step=run_step) -> Path:
    """Write the three predictions of every image of the split with ``model_path`` (default:
    train.out's model.pt); returns the output folder. ``step`` runs each chunk of CHUNK images
    and the pseudo-label export (``stage.run_step``). SIGTERM or SIGINT stop it after the
    current image, raising ``Stopped``; a rerun resumes."""
    model_path = model_path or Path(params.train.out) / "model.pt"
    out = Path(params.infer.out)
    with stage(out, params.infer.device) as run:
        _infer(params, model_path, run, step)
    return out


def _infer(params: Params, model_path: str | Path, run: Run, step) -> None:
    p, device, stop = params.infer, run.device, run.stop
    out = Path(p.out)
    if distributed.is_main():
        # Predictions of another model or other settings must not be resumed from.
        stamp = out / "fingerprint.txt"
        fingerprint = f"{file_digest(model_path)} {params_fingerprint(params, ('data', 'infer'))}"
        if stamp.exists() and stamp.read_text() != fingerprint:
            discard_stale(out, "predictions")
        for variant in VARIANTS:
            (out / variant).mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
    distributed.barrier()
    model = load_model(model_path, device)
    data = EvalDataset(params.dataset_dir, p.split)
    todo = [i for i in distributed.shard(range(len(data)))
            if not all(_written(out / v / f"{data.records[i].image_id}.png") for v in VARIANTS)]
    # Forkserver workers, not forked ones: a forked worker would hold this run's folder lock.
    with (ProcessPoolExecutor(max_workers=p.workers, initializer=_crf_worker,
                              mp_context=forkserver()) as pool,
          tqdm(total=len(todo), desc=f"infer {p.split}", unit="image",
               disable=not distributed.is_main()) as bar):
        for first in range(0, len(todo), CHUNK):
            if stop.is_set():
                break
            chunk = todo[first:first + CHUNK]
            step("segment",
                 lambda: _segment(model, data, chunk, out, p, device, pool, stop, bar),
                 f"{data.records[chunk[0]].image_id} to {data.records[chunk[-1]].image_id}")
    if p.export_pseudo and not stop.is_set():
        train_data = EvalDataset(params.dataset_dir, params.train.split)
        step("export pseudo labels",
             lambda: export_pseudo_labels(model, train_data, out / "pseudo", device, stop))
    if stop.is_set():
        raise Stopped(f"{out}: stopped by a signal; the images done are kept, run again to resume")
    distributed.barrier()


def _segment(model, data: EvalDataset, indices: list[int], out: Path, p: InferParams,
             device, pool, stop, bar) -> None:
    """Write the predictions of the images ``indices`` of ``data``, the CRF's on ``pool``;
    returns once all are written, or after the image at which the Event ``stop`` is set."""
    jobs = []
    for i in indices:
        if stop.is_set():
            break
        item = data[i]
        name = f"{item.image_id}.png"
        single, probs = segment(model, item.image[None].to(device), p)
        save_label_map(single, out / "single" / name)
        save_label_map(probs.argmax(0).astype(np.uint8), out / "msf" / name)
        jobs.append(pool.submit(_crf_job, _rgb(item.image), probs, vars(p.crf), out / "crf" / name))
        # Bound the queue: each job holds an image's probabilities.
        while sum(not j.done() for j in jobs) > 2 * p.workers:
            jobs[0].result()
            jobs = [j for j in jobs if not j.done()]
        bar.update()
    for job in jobs:
        job.result()


def _written(path: Path) -> bool:
    """Whether an output of an earlier run is there to be kept. Written whole or not at all by
    this program, one that does not open was damaged outside it: an error that names it."""
    if not path.exists():
        return False
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # Pillow raises many types for damaged files
        raise ValueError(f"{path}: a damaged output of an earlier run ({type(e).__name__}); "
                         "delete it to make it again") from None
    return True


def _crf_worker() -> None:
    """A CRF worker ends with its fork server and leaves Ctrl-C to the stage, which finishes
    the images under way and stops."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _rgb(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] 0-255 float -> uint8 [H, W, 3]."""
    return image.permute(1, 2, 0).numpy().astype(np.uint8)


@torch.no_grad()
def segment(model, image: torch.Tensor, p: InferParams) -> tuple[np.ndarray, np.ndarray]:
    """One image [1, 3, H, W] (0-255) -> (single-scale labels uint8 [H, W], multi-scale + flip
    probabilities float32 [C, H, W])."""
    single = predict(model, image, scales=(1.0,), flip=False, long_side=p.long_side)
    probs = predict(model, image, scales=p.scales, flip=p.flip, long_side=p.long_side)
    return single.argmax(1)[0].cpu().numpy().astype(np.uint8), probs[0].cpu().numpy()


@torch.no_grad()
def export_pseudo_labels(model, data: EvalDataset, out: Path, device, stop) -> Path:
    """The RFM + PAR pseudo label of this rank's share of ``data`` as palette PNGs (resumable;
    ends early when the Event ``stop`` is set)."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in distributed.shard(range(len(data)))
            if not _written(out / f"{data.records[i].image_id}.png")]
    for i in tqdm(todo, desc="pseudo labels", unit="image", disable=not distributed.is_main()):
        if stop.is_set():
            break
        item = data[i]
        pseudo = model(item.image[None].to(device), item.labels[None]).pseudo[0]
        save_label_map(pseudo.cpu().numpy().astype(np.uint8), out / f"{item.image_id}.png")
    return out


def predict_files(model_path: str | Path, images: list[Path], out: Path,
                  p: InferParams = InferParams()) -> list[Path]:
    """Segment image files with the model of ``model_path`` and the settings ``p``:
    ``out``/<stem>.png (palette mask) and <stem>_overlay.png each."""
    device = distributed.local_device(p.device)
    model = load_model(model_path, device)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(images, desc="predict", unit="image"):
        image = load_image(path)  # a bad file: a ValueError naming it
        _, probs = segment(model, image[None].to(device), p)
        labels = dense_crf(_rgb(image), probs, **vars(p.crf)).argmax(0).astype(np.uint8)
        written.append(save_label_map(labels, out / f"{path.stem}.png"))
        write_image(overlay(_rgb(image), labels), out / f"{path.stem}_overlay.png")
    return written
