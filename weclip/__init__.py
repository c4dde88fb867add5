"""WeCLIP: weakly supervised semantic segmentation on a frozen CLIP (CVPR 2024), on open_clip;
and WeCLIP+ (TPAMI 2025), a frozen DINOv2 beside it.

    model = weclip.load_model("runs/train/model.pt")   # a trained model, from its file alone
    probs = weclip.predict(model, images)              # images [B, 3, H, W] on the 0-255 scale

The names below are imported when first used (PEP 562), so that ``import weclip.contract``
loads no torch and each pipeline stage depends only on the modules it uses.
"""
from importlib import import_module

_EXPORTS = {
    "BackboneFeatures": "batch", "ClassInfo": "contract", "DinoConfig": "config",
    "FrozenCLIP": "backbone", "FrozenDINO": "dino", "ModelConfig": "config", "WeCLIP": "model",
    "WeCLIPOutput": "model", "WeCLIPPlus": "plus", "create_clip": "backbone",
    "create_model": "factory", "load_model": "factory", "predict": "inference",
    "save_model": "factory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'weclip' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
