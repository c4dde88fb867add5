"""The WeCLIP+ authors' released forward on two images, on any device, its intermediate CAMs kept.

Run by ``compare_authors_plus.py`` with the Python of an environment that has what the
authors' forward imports (opencv, lxml, ftfy, regex, torch; nothing of their code is copied
here, it is imported from ``--authors``). In memory only: ``.cuda()`` becomes a move to
``--device``, ``torch.hub.load`` of DINOv2 takes the source checkout ``--dinov2`` without
downloading weights, and two imports their forward never uses get empty stand-ins (mmcv's
ConvModule, imported by their SegFormer head; ``pkg_resources.packaging``, gone from recent
setuptools). Writes ``--out``: the random DINOv2 and decoder weights it built (for this project's
side to load), and per image the Grad-CAMs, the refined CAMs and the pseudo labels.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch


def stand_ins(device: torch.device, dinov2: Path) -> None:
    """The in-memory patches described above."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self.to(device)
    hub_load = torch.hub.load
    torch.hub.load = lambda repo, name, *args, **kwargs: hub_load(
        str(dinov2), name, source="local", pretrained=False)
    mmcv = types.ModuleType("mmcv")
    mmcv.cnn = types.ModuleType("mmcv.cnn")
    mmcv.cnn.ConvModule = None
    sys.modules.update({"mmcv": mmcv, "mmcv.cnn": mmcv.cnn})
    if "pkg_resources" not in sys.modules:
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)


def write_voc(root: Path, names: list[str], labels: list[list[int]]) -> None:
    """The annotation files their forward reads the image labels from (VOC class ids 1..20)."""
    from clip.clip_text import class_names

    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for name, ids in zip(names, labels):
        objects = "".join(f"<object><name>{class_names[i - 1]}</name></object>" for i in ids)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>320</width><height>320</height></size>{objects}"
            "</annotation>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, type=Path, help="their WeCLIP+/ folder")
    parser.add_argument("--dinov2", required=True, type=Path, help="a DINOv2 source checkout")
    parser.add_argument("--clip-weights", required=True, type=Path)
    parser.add_argument("--inputs", required=True, type=Path, help="images and labels (.pt)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    stand_ins(device, args.dinov2)
    sys.path.insert(0, str(args.authors))
    import WeCLIP_Plus.model_attn_aff_voc as theirs

    inputs = torch.load(args.inputs)
    names = [f"image{i}" for i in range(len(inputs["images"]))]
    write_voc(args.out / "voc", names, inputs["labels"])

    kept = {"grad_cam": [], "refined": [], "keys": []}
    generate = theirs.generate_cam_label

    def keep_refined(cam_refined_list, keys, w, h):  # their refined CAMs, rescaled and resized
        cams = generate(cam_refined_list, keys, w, h)
        kept["refined"].append(cams["refined_cam"].float().cpu())
        kept["keys"].append(list(keys))
        return cams

    theirs.generate_cam_label = keep_refined
    torch.manual_seed(0)
    model = theirs.WeCLIP_Plus(num_classes=21, clip_model=str(args.clip_weights),
                               dino_model="dinov2_vits14", dino_fts_dim=384, decoder_layers=3,
                               embedding_dim=256, in_channels=[768] * 4,
                               dataset_root_path=str(args.out / "voc"), clip_flag=16,
                               device=device).to(device).eval()
    grad_cam = model.grad_cam

    def keep_grad_cam(*call_args, **call_kwargs):
        result = grad_cam(*call_args, **call_kwargs)
        kept["grad_cam"].append(torch.from_numpy(result[0][0]).float())
        return result

    model.grad_cam = keep_grad_cam
    images = ((inputs["images"].float() - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1))
              / torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)).to(device)
    seg_clip, seg_dino, labels, _ = model(images, img_names=names, mode="train")
    grad_cams, i = [], 0
    for keys in kept["keys"]:
        grad_cams.append(torch.stack(kept["grad_cam"][i:i + len(keys)]))
        i += len(keys)
    torch.save({"dino": model.dino_encoder.state_dict(),
                "decoder": {k: v for k, v in model.state_dict().items()
                            if k.split(".")[0] in ("decoder", "decoder_fts_fuse",
                                                   "dino_decoder_fts_fuse")},
                "keys": kept["keys"], "grad_cam": grad_cams, "refined": kept["refined"],
                "pseudo": labels.cpu(), "logits": (0.5 * seg_clip + 0.5 * seg_dino).cpu()},
               args.out / "authors.pt")


if __name__ == "__main__":
    main()
