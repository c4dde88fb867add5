"""WeCLIP: weakly supervised semantic segmentation on a frozen CLIP (CVPR 2024), on open_clip.

    model = weclip.load_model("runs/train/model.pt")   # a trained model, from its file alone
    probs = weclip.predict(model, images)              # images [B, 3, H, W] on the 0-255 scale
"""
from .backbone import BackboneFeatures, FrozenCLIP, create_clip
from .config import ModelConfig
from .dataset import ClassInfo
from .factory import create_model, load_model, save_model
from .inference import predict
from .model import WeCLIP, WeCLIPOutput

__all__ = ["BackboneFeatures", "ClassInfo", "FrozenCLIP", "ModelConfig", "WeCLIP", "WeCLIPOutput",
           "create_clip", "create_model", "load_model", "predict", "save_model"]
