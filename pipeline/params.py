"""params.yaml, typed: one dataclass per stage group, unknown keys refused by name."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class WorldParams:
    image_size: int = 128
    n_pretrain: int = 4000
    n_train: int = 1000
    n_val: int = 200


@dataclass
class DataParams:
    dataset: str = "world"  # world | voc | coco | folder
    seed: int = 0  # the synthetic world's seed
    out: str = "data/prepared"
    skip_bad: bool = False
    workers: int = 2
    world: WorldParams = field(default_factory=WorldParams)
    voc: dict = field(default_factory=dict)  # keyword arguments of prepare_voc
    coco: dict = field(default_factory=dict)  # keyword arguments of prepare_coco
    folder: dict = field(default_factory=dict)  # keyword arguments of prepare_folder


@dataclass
class ClipParams:
    arch: str = "ViT-B-16-quickgelu"
    weights: str | None = None  # a file, an open_clip pretrained tag, or null for random
    template: str = "a clean origami {}."
    normalization: str = "imagenet"


@dataclass
class ModelParams:
    decoder_dim: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    dropout: float = 0.1
    box_threshold: float = 0.4
    static_layers: int | None = None  # null: 8/12 of the backbone's depth
    rfm_layers: int | None = None  # null: 6/12 of the backbone's depth
    rfm_signed: bool = True
    background_power: float = 1.0
    par_dilations: list = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    par_iters: int = 20


@dataclass
class CacheParams:
    path: str = "data/cache/train.zarr"
    batch_size: int = 8
    device: str = "auto"


@dataclass
class TrainParams:
    split: str = "train"
    val_split: str = "val"
    features: str = "online"  # online | cache
    supervision: str = "pseudo"  # pseudo | masks (ground truth: the fully supervised bound)
    device: str = "auto"
    amp: bool = False
    seed: int = 1
    iters: int = 30000
    rfm_start: int = 15000  # iterations before this use static refinement
    batch_size: int = 4
    crop_size: int = 320
    scale_range: list = field(default_factory=lambda: [0.5, 2.0])
    lr: float = 2e-4
    decoder_lr_mult: float = 10.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    power: float = 1.0
    radius: int = 8
    affinity_weight: float = 0.1
    workers: int = 2
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 2000
    eval_images: int = 200  # images of each split scored at a periodic evaluation
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
    scales: list = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    long_side: int | None = 512
    crf: CRFParams = field(default_factory=CRFParams)
    workers: int = 2
    device: str = "auto"
    export_pseudo: bool = True  # also write the train split's pseudo labels as PNGs
    out: str = "runs/infer"


@dataclass
class EvaluateParams:
    train_images: int | None = 500  # train images in the CAM ablation (null: all)
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
    clip: ClipParams = field(default_factory=ClipParams)
    model: ModelParams = field(default_factory=ModelParams)
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
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        kwargs[name] = (_build(type(default), value, f"{where}.{name}")
                        if dataclasses.is_dataclass(default) else value)
    return cls(**kwargs)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Params from ``path`` (missing keys take the defaults above), then dotted ``overrides``
    such as {"train.iters": 10}."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    for dotted, value in (overrides or {}).items():
        *parents, key = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return _build(Params, values, str(path))


def params_fingerprint(params: Params, groups: tuple[str, ...]) -> str:
    """A digest of the named groups, and with 'clip' of the CLIP weight file's contents:
    resumable outputs kept across runs (DVC `persist`) are reused only by a run with the same
    settings and weights."""
    values = {g: dataclasses.asdict(getattr(params, g)) for g in groups}
    if "clip" in groups and params.clip.weights and Path(params.clip.weights).is_file():
        values["clip_weights_digest"] = file_digest(params.clip.weights)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]
