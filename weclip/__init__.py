"""WeCLIP: weakly supervised semantic segmentation on a frozen CLIP (CVPR 2024), on open_clip."""
from .backbone import BackboneFeatures, FrozenCLIP, create_clip
from .model import WeCLIP, WeCLIPOutput

__all__ = ["BackboneFeatures", "FrozenCLIP", "WeCLIP", "WeCLIPOutput", "create_clip"]
