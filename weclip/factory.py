"""Building WeCLIP or WeCLIP+ from its configuration, and the self-describing model file.

``model.pt`` holds everything needed to use a trained model anywhere: the configuration, the
class names, prompts and background words, the identity of the frozen CLIP (its config, its
weights as configured and a digest of them) and, for WeCLIP+, of the frozen DINO, and the
decoder's weights. The frozen backbones' own weights are not copied into it (ViT-B/16 is 600
MB); ``load_model`` finds them again from the configuration and checks the digests.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .backbone import FrozenCLIP
from .config import ModelConfig
from .contract import ClassInfo
from .dino import FrozenDINO
from .files import torch_bytes, write_atomically
from .model import WeCLIP
from .plus import WeCLIPPlus

FORMAT = "weclip-model/2"


def create_model(config: ModelConfig, classes: ClassInfo) -> WeCLIP:
    """A WeCLIP of ``config`` for ``classes`` (WeCLIP+ when ``config.dino`` is set), its decoder
    untrained."""
    backbone = FrozenCLIP.from_config(config)
    if config.dino is None:
        return WeCLIP(backbone, classes, config)
    return WeCLIPPlus(backbone, FrozenDINO.from_config(config.dino), classes, config)


def save_model(model: WeCLIP, path: str | Path) -> Path:
    """Write ``model`` as a self-describing file (atomically); returns the path."""
    state = {"format": FORMAT, "config": asdict(model.config), "classes": asdict(model.classes),
             "backbone": {"arch": model.config.arch, "weights": model.config.weights,
                          "digest": model.backbone.digest()},
             "decoder": model.decoder.state_dict()}
    if model.config.dino is not None:
        state["dino"] = {**asdict(model.config.dino), "digest": model.dino.digest()}
    return write_atomically(path, torch_bytes(state))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               weights: str | None = None, dino_weights: str | None = None) -> WeCLIP:
    """The trained WeCLIP (or WeCLIP+) of a file written by ``save_model``, in eval mode on
    ``device``.

    ``weights`` (``dino_weights``) replaces the frozen CLIP's (DINO's) weight file or tag
    recorded in the file, for a model moved to a machine that keeps the weights elsewhere;
    either way the weights must be the ones the model was trained on.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model file not found") from None
    except Exception as e:  # torch raises a variety of errors for files that are not its own
        raise ValueError(f"{path}: not a WeCLIP model file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a WeCLIP model file of format {FORMAT!r} (found "
                         f"{found!r}); a model.pt of an older version must be trained again")
    try:
        config = ModelConfig(**state["config"])
    except TypeError as e:  # a file of another version of this package
        raise ValueError(f"{path}: its model configuration does not fit this version ({e})") from None
    if weights is not None:
        config.weights = weights
    if dino_weights is not None and config.dino is not None:
        config.dino.weights = dino_weights
    model = create_model(config, ClassInfo(**state["classes"]))
    if model.backbone.digest() != state["backbone"]["digest"]:
        raise ValueError(f"{path}: the frozen CLIP {config.arch} with weights {config.weights!r} "
                         "is not the one this model was trained on (digest differs); pass the "
                         "right weights")
    if config.dino is not None and model.dino.digest() != state["dino"]["digest"]:
        raise ValueError(f"{path}: the frozen DINO {config.dino.arch} with weights "
                         f"{config.dino.weights!r} is not the one this model was trained on "
                         "(digest differs); pass the right dino_weights")
    model.decoder.load_state_dict(state["decoder"])
    return model.to(device).eval()
