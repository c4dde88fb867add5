"""params.yaml, typed: one dataclass per stage group, unknown keys refused by name, every value
checked against its type and range before any work starts.

The defaults here (and the model's, ``weclip.config.ModelConfig``) are the paper's VOC
settings as the authors' code runs them. A recipe (``params/<name>.yaml``) states only what
differs from them; ``write_recipe`` renders one in full as params.yaml, which DVC reads.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import yaml

from weclip.config import NORMALIZATION, ModelConfig
from weclip.files import file_digest
from weclip.model_configs import register_model_configs
from weclip.weights import is_weight_file, resolve_weights

RECIPES = Path(__file__).resolve().parent.parent / "params"


@dataclass
class WorldParams:
    image_size: int = 128
    n_pretrain: int = 4000
    n_train: int = 1000
    n_val: int = 200


@dataclass
class DataParams:
    dataset: str = "voc"  # world | voc | coco | folder
    seed: int = 0  # the synthetic world's seed
    out: str = "data/prepared"
    skip_bad: bool = False
    workers: int = 2
    max_pixels: int = 50_000_000  # larger images are refused (weclip.contract.MAX_PIXELS)
    world: WorldParams = field(default_factory=WorldParams)
    voc: dict = field(default_factory=dict)  # keyword arguments of prepare_voc
    coco: dict = field(default_factory=dict)  # keyword arguments of prepare_coco
    folder: dict = field(default_factory=dict)  # keyword arguments of prepare_folder


@dataclass
class CacheParams:
    path: str = "data/cache/train.zarr"
    batch_size: int = 8
    shard_size: int = 64  # images per shard file (the unit of work and of resuming)
    device: str = "auto"
    nproc: int = 1  # processes (GPUs) that share the images


@dataclass
class TrainParams:
    split: str = "train_aug"
    val_split: str = "val"
    features: str = "online"  # online | cache
    supervision: str = "pseudo"  # pseudo | masks (ground truth: the fully supervised bound)
    device: str = "auto"
    amp: bool = False  # bfloat16 autocast, the frozen backbones cast to bfloat16 once
    compile: bool = False  # the step's parts compiled with torch.compile
    seed: int = 1
    iters: int = 30000
    # Iterations before this one (counted from 0) use static refinement. The paper says
    # 15000; the authors' code switches at 9144 on VOC (docs/method.md, section 8).
    rfm_start: int = 9144
    nproc: int = 1  # processes (GPUs) to train on; train.batch_size is split among them
    batch_size: int = 4
    # Class slots per image in a batch's pseudo labels (one shape per crop size); null: the
    # most labels of an image of the split.
    max_labels: int | None = None
    crop_size: int = 320
    # WeCLIP+ (docs/method.md, section 10): the Dice loss and the cross-branch losses' weights,
    # and from which iteration (counted from 0; null: never) the prediction replaces the pseudo
    # labels where its confidence is over self_training_confidence.
    dice_weight: float = 0.0
    cross_weight: float = 0.0
    self_training_start: int | None = None
    self_training_confidence: float = 0.75
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    lr: float = 2e-4
    decoder_lr_mult: float = 10.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    power: float = 1.0
    radius: int = 8
    affinity_weight: float = 0.1
    workers: int = 2
    log_every: int = 50
    checkpoint_every: int = 1000
    eval_every: int = 2000
    eval_images: int = 1449  # images of each split scored at a periodic evaluation
    out: str = "runs/train"


@dataclass
class CRFParams:
    iterations: int = 10
    pos_sxy: float = 3
    pos_compat: float = 3
    bi_sxy: float = 64
    bi_srgb: float = 5
    bi_compat: float = 4


@dataclass
class InferParams:
    split: str = "val"
    scales: list[float] = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    long_side: int | None = 512
    crf: CRFParams = field(default_factory=CRFParams)
    workers: int = 2
    device: str = "auto"
    export_pseudo: bool = True  # also write the train split's pseudo labels as PNGs
    nproc: int = 1  # processes (GPUs) that share the images
    out: str = "runs/infer"


@dataclass
class EvaluateParams:
    pseudo_split: str = "train"  # where pseudo labels are scored: VOC's own 1,464 train images
    train_images: int | None = None  # images of pseudo_split in the CAM ablation (null: all)
    qualitative: int = 4
    out: str = "reports"


@dataclass
class UpperBoundParams:
    """The same decoder trained on ground-truth masks, for context (datasets with masks)."""
    enabled: bool = False
    out: str = "runs/upper_bound"


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheParams = field(default_factory=CacheParams)
    train: TrainParams = field(default_factory=TrainParams)
    infer: InferParams = field(default_factory=InferParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    upper_bound: UpperBoundParams = field(default_factory=UpperBoundParams)

    @property
    def dataset_dir(self) -> Path:
        return Path(self.data.out) / self.data.dataset


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        group = _group_type(hints[name])
        kwargs[name] = (_build(group, value, f"{where}.{name}")
                        if group is not None and isinstance(value, dict) else value)
    return cls(**kwargs)


def _group_type(hint):
    """The dataclass a field of annotation ``hint`` holds (``X`` or ``X | None``), else None."""
    for candidate in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: parameters file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None


# What each value must be besides its annotated type: a check per dotted key that returns
# what is allowed when the value is not (None when it is). A check may read keys declared
# before its own, which are checked first.


def _at_least(low):
    return lambda value, p: None if value >= low else f"must be at least {low}"


def _between(low, high):
    return lambda value, p: None if low <= value <= high else f"must be between {low} and {high}"


def _one_of(*choices):
    return lambda value, p: None if value in choices else f"must be one of {', '.join(choices)}"


def _named(name, known, kind, hint=""):
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=4)
    return f"must be {kind}" + (f", e.g. {', '.join(close)}" if close else hint)


def _weight_or_tag(weights, arch, tags):
    if is_weight_file(weights) or weights in tags:
        return None
    return (f"must be null, a weight file or a pretrained tag of {arch} "
            f"({', '.join(tags) or 'it has none'})")


def _known_arch(arch, p):
    register_model_configs()
    return _named(arch, open_clip.list_models(), "an open_clip model config",
                  " (see open_clip.list_models())")


def _weights(weights, p):
    arch = p.model.arch
    return _weight_or_tag(weights, arch, open_clip.list_pretrained_tags_by_model(arch))


def _dino_arch(arch, p):
    import timm

    from weclip.model_configs import DINO_CONFIGS

    return _named(arch, [*timm.list_models("*dinov2*"), *DINO_CONFIGS], "a DINOv2 ViT of timm")


def _dino_weights(weights, p):
    import timm

    arch = p.model.dino.arch
    return _weight_or_tag(weights, arch, [name.partition(".")[2]
                                          for name in timm.list_pretrained(f"{arch}.*")])


def _device(device, p):
    kind, colon, index = device.partition(":")
    if device in ("auto", "cpu") or kind == "cuda" and (not colon or index.isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:<index>"


CHECKS = {
    "data.workers": _at_least(0),
    "data.max_pixels": _at_least(1),
    "model.arch": _known_arch,
    "model.weights": _weights,
    "model.normalization": _one_of(*NORMALIZATION),
    "model.decoder_dim": _at_least(1),
    "model.decoder_layers": _at_least(1),
    "model.decoder_heads": lambda heads, p: (
        None if heads >= 1 and p.model.decoder_dim % heads == 0
        else f"must divide model.decoder_dim ({p.model.decoder_dim})"),
    "model.dropout": _between(0, 1),
    "model.cam_layer": lambda layer, p: None if layer < 0 else "must be negative (-1: block N-1)",
    "model.box_threshold": _between(0, 1),
    "model.dino.arch": _dino_arch,
    "model.dino.weights": _dino_weights,
    "cache.batch_size": _at_least(1),
    "cache.shard_size": _at_least(1),
    "cache.device": _device,
    "cache.nproc": _at_least(1),
    "train.features": lambda features, p: (
        _one_of("online", "cache")(features, p) or (
            "must be online with model.dino (the cache holds the CLIP's features only)"
            if features == "cache" and p.model.dino is not None else None)),
    "train.supervision": lambda supervision, p: (
        _one_of("pseudo", "masks")(supervision, p) or (
            "must be pseudo with train.features: cache (the cache holds no masks)"
            if supervision == "masks" and p.train.features == "cache" else None)),
    "train.device": _device,
    "train.iters": _at_least(1),
    # rfm_start == iters: static refinement throughout.
    "train.rfm_start": lambda start, p: (
        None if 0 <= start <= p.train.iters
        else f"must be between 0 and train.iters ({p.train.iters})"),
    "train.nproc": _at_least(1),
    "train.batch_size": lambda size, p: (
        None if size >= 1 and size % p.train.nproc == 0
        else f"must be a positive multiple of train.nproc ({p.train.nproc})"),
    "train.max_labels": _at_least(1),
    "train.crop_size": _between(32, 2048),
    "train.scale_range": lambda scales, p: (
        None if len(scales) == 2 and 0 < scales[0] <= scales[1]
        else "must be two numbers [low, high] with 0 < low <= high"),
    "train.lr": lambda lr, p: None if lr > 0 else "must be greater than 0",
    "train.betas": lambda betas, p: (
        None if len(betas) == 2 and all(0 <= b < 1 for b in betas)
        else "must be two numbers in [0, 1)"),
    "train.warmup_iters": _at_least(0),
    "train.workers": _at_least(0),
    "train.log_every": _at_least(1),
    "train.checkpoint_every": _at_least(1),
    "train.eval_every": _at_least(1),
    "train.eval_images": _at_least(1),
    "train.dice_weight": _at_least(0),
    "train.cross_weight": lambda weight, p: (
        None if weight == 0 or weight > 0 and p.model.dino
        else "must be 0 without model.dino (WeCLIP has one branch), at least 0 with it"),
    "train.self_training_start": _at_least(0),
    "train.self_training_confidence": _between(0, 1),
    "infer.scales": lambda scales, p: (
        None if scales and all(s > 0 for s in scales)
        else "must be a non-empty list of numbers greater than 0"),
    "infer.long_side": _at_least(1),
    "infer.workers": _at_least(1),  # CRF processes
    "infer.device": _device,
    "infer.nproc": _at_least(1),
    "evaluate.train_images": _at_least(1),
}


def _weight_file_present(weights, p):
    if is_weight_file(weights) and not Path(resolve_weights(weights)).is_file():
        return "is not an existing file"
    return None


def _device_present(device, p):
    kind, _, index = device.partition(":")
    gpus = torch.cuda.device_count()
    if kind == "cuda" and int(index or 0) >= gpus:
        return f"is not a device of this machine ({gpus} CUDA devices); use auto or cpu"
    return None


# What must be on this machine: checked only for the keys a command needs (``load_params``'s
# ``needs``), as a recipe is written and data prepared before the CLIP weights are in place.
PRESENCE = {"model.weights": _weight_file_present, "model.dino.weights": _weight_file_present,
            "cache.device": _device_present,
            "train.device": _device_present, "infer.device": _device_present}

TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              dict: "a mapping", type(None): "null", list[int]: "a list of integers",
              list[float]: "a list of numbers"}


def _has_type(value, hint) -> bool:
    """``value`` is of annotation ``hint``: a YAML number is a float, a YAML bool no number."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return TYPE_NAMES.get(hint, "a mapping of its keys")  # a group: DinoConfig


def _leaves(obj, prefix: str = ""):
    """(dotted key, value, annotation) of every field below the dataclass ``obj``, in order."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, hints[f.name]


def _problem(key: str, value, hint, params: Params, needs: Collection[str]) -> str | None:
    if not _has_type(value, hint):
        return f"is not {_type_name(hint)}"
    if value is None:  # allowed by an Optional annotation: nothing more to check
        return None
    for check in (CHECKS.get(key), PRESENCE.get(key) if key in needs else None):
        if check and (problem := check(value, params)):
            return problem
    return None


def _validate(params: Params, needs: Collection[str]) -> None:
    """Raise ValueError('<key>: <value> <what is allowed>') for the first value that is wrong."""
    for key, value, hint in _leaves(params):
        if problem := _problem(key, value, hint, params, needs):
            raise ValueError(f"{key}: {value!r} {problem}")


def load_params(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None,
                needs: Collection[str] = ()) -> Params:
    """Params from ``path`` (missing keys take the defaults above; None: the defaults alone),
    then dotted ``overrides`` such as {"train.iters": 10}, checked: ValueError names the first
    wrong value. ``needs``: keys of PRESENCE whose file or device must be on this machine."""
    values = _read_yaml(Path(path)) if path is not None else {}
    path = path or "defaults"
    for dotted, value in (overrides or {}).items():
        *parents, key = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    params = _build(Params, values, str(path))
    _validate(params, needs)
    return params


def write_recipe(name: str, out: str | Path = "params.yaml") -> Path:
    """Render recipe ``params/<name>.yaml`` over the defaults as a complete params file."""
    recipe = RECIPES / f"{name}.yaml"
    params = load_params(recipe)
    header = (f"# The {name!r} recipe in full: params/{name}.yaml over the defaults, written by\n"
              f"# `weclip recipe {name}`. Edit the recipe and rerun that, or edit this file for a\n"
              "# one-off run; docs/method.md explains every model and training setting.\n")
    text = header + yaml.safe_dump(dataclasses.asdict(params), sort_keys=False)
    Path(out).write_text(text)
    return Path(out)


def params_fingerprint(params: Params, groups: tuple[str, ...]) -> str:
    """A digest of the named groups, and with 'model' of the CLIP weight file's contents:
    resumable outputs kept across runs (DVC `persist`) are reused only by a run with the same
    settings and weights."""
    values = {g: dataclasses.asdict(getattr(params, g)) for g in groups}
    dino = params.model.dino
    for name, weights in (("clip", params.model.weights), ("dino", dino and dino.weights)):
        weights = resolve_weights(weights)
        if "model" in groups and weights and Path(weights).is_file():
            values[f"{name}_weights_digest"] = file_digest(weights)[:16]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
