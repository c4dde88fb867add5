"""This project's WeCLIP+ pseudo labels against the authors' released forward, on the same weights.

    python benchmarks/compare_authors_plus.py --authors path/to/WeCLIP-repo/WeCLIP+ \\
        --dinov2 path/to/dinov2-checkout [--authors-python PY] [--device cpu]

Two random 320 x 320 images with VOC labels, random ViT-B/16 weights (OpenAI's layout, which
both load) and a random DINOv2 ViT-S/14. The authors' forward runs first, in its own Python,
through ``authors_plus_forward.py``: it builds their model (random decoder and DINO), keeps
their Grad-CAMs, refined CAMs, pseudo labels and logits, and saves the decoder and DINO
weights. This project's WeCLIP+ is then built with the same weights (their decoder's keys
renamed) in the voc-plus settings, and both in eval mode (Dropout off). Prints the largest
difference of each intermediate and the share of pixels whose pseudo label agrees.

With random weights every attention map spreads its mass almost evenly, so the RFM's layer
scores lie within float rounding of their mean and the maps kept can differ between two exact
implementations: a refined CAM that differs where the Grad-CAM does not is that, and the maps
this project kept are printed to tell.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.datasets.voc import voc_class_info
from weclip import DinoConfig, ModelConfig, create_clip, create_model
from weclip.batch import PresentClasses
from weclip.decoder import affinity
from weclip.refine import select_attention

ARCH = "ViT-B-16-quickgelu"
LABELS = [[7, 12, 15], [1]]  # VOC ids of each image's classes, ascending (the slot order)


def our_decoder_state(theirs: dict) -> dict:
    """Their decoder and SegFormer heads' weights under this project's PlusDecoder names."""
    renames = [("dino_decoder_fts_fuse.", "dino."), ("decoder_fts_fuse.", "clip."),
               ("linears_modulelist.0.proj.", "level_mlps.0.0."),
               ("linears_modulelist.0.proj_2.", "level_mlps.0.2."), ("linear_fuse.", "fuse."),
               ("decoder.transformer.resblocks.", "head.layers."),
               ("decoder.linear_pred.", "head.classifier."),
               (".mlp.c_fc.", ".mlp.0."), (".mlp.c_proj.", ".mlp.2.")]
    state = {}
    for key, value in theirs.items():
        for old, new in renames:
            key = key.replace(old, new)
        state[key] = value
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, type=Path, help="their WeCLIP+/ folder")
    parser.add_argument("--dinov2", required=True, type=Path, help="a DINOv2 source checkout")
    parser.add_argument("--authors-python", default=sys.executable,
                        help="a Python with what their forward imports")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    clip_weights = work / "ViT-B-16-random.pt"
    torch.save(create_clip(ARCH).state_dict(), clip_weights)
    images = torch.randint(0, 256, (len(LABELS), 3, 320, 320), dtype=torch.uint8)
    torch.save({"images": images, "labels": LABELS}, work / "inputs.pt")
    command = [args.authors_python, str(Path(__file__).with_name("authors_plus_forward.py")),
               "--authors", str(args.authors), "--dinov2", str(args.dinov2),
               "--clip-weights", str(clip_weights), "--inputs", str(work / "inputs.pt"),
               "--out", str(work), "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if result.returncode:
        sys.exit(f"the authors' forward failed:\n{result.stderr[-3000:]}")
    theirs = torch.load(work / "authors.pt", weights_only=False)
    torch.save(theirs["dino"], work / "dinov2_vits14_random.pth")

    device = torch.device(args.device)
    config = ModelConfig(arch=ARCH, weights=str(clip_weights), cam_layer=-2, box_threshold=None,
                         dino=DinoConfig("vit_small_patch14_dinov2",
                                         str(work / "dinov2_vits14_random.pth")))
    model = create_model(config, voc_class_info())
    model.decoder.load_state_dict(our_decoder_state(theirs["decoder"]))
    model = model.to(device).eval()
    labels = torch.zeros(len(LABELS), 20)
    for row, ids in zip(labels, LABELS):
        row[[i - 1 for i in ids]] = 1
    pairs = PresentClasses.from_labels(labels).to(device)
    x = images.float().to(device)
    with torch.no_grad():
        features = model.features(x)
        logits, fused, _ = model.decode(features)
        aff = affinity(fused)
        grad_cams = model.initial_cams(features.tokens[:, -2], features.grid, pairs)
        scale = model.cam_scale(logits, features, pairs)
        refined = model.cams(x, pairs, features, aff, "rfm", scale)
        attn = torch.cat([features.attn[:, :-1],
                          model.backbone.last_attention(features.tokens[:, -2])[:, None]], 1)
        kept = select_attention(attn[:, :, 1:, 1:], aff, model.rfm_layers)[1]
        pseudo = model.pseudo_labels(x, pairs, features, aff, "rfm", logits=logits)

    def largest(ours: torch.Tensor, reference: torch.Tensor) -> float:
        return float((ours.detach().cpu().float() - reference.detach().float()).abs().max())

    print(f"device {args.device}; random ViT-B/16 and DINOv2 ViT-S/14, 2 images of 320 x 320, "
          f"VOC classes {LABELS}")
    print(f"decoder logits (0.5 CLIP + 0.5 DINO): max |diff| "
          f"{largest(logits, theirs['logits']):.2e}")
    for i, keys in enumerate(theirs["keys"]):
        k = len(keys)
        print(f"image {i}: Grad-CAM max |diff| {largest(grad_cams[i, :k], theirs['grad_cam'][i]):.2e}"
              f", refined CAM max |diff| {largest(refined[i, :k], theirs['refined'][i]):.2e}"
              f" (RFM maps kept here: {kept[i].int().tolist()})")
    agree = float((pseudo.cpu() == theirs["pseudo"]).float().mean())
    print(f"pseudo labels: {100 * agree:.2f}% of pixels agree")


if __name__ == "__main__":
    main()
