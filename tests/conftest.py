"""Shared fixtures: a tiny open_clip ViT (random weights) registered as 'WeCLIP-Test-Tiny', a
Prefect server, a local file server."""
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded in tests

import open_clip
import pytest
import torch

TINY = "WeCLIP-Test-Tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_arch_configs(tmp_path_factory):
    """A folder holding the tiny architecture's config alone: what a process the tests start
    passes to ``open_clip.add_model_config`` to know it."""
    folder = tmp_path_factory.mktemp("model_configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    return folder


@pytest.fixture(scope="session")
def tiny_arch(tiny_arch_configs):
    open_clip.add_model_config(tiny_arch_configs)
    return TINY


@pytest.fixture(scope="session")
def tiny_clip_weights(tiny_arch, tmp_path_factory):
    """A plain state dict of a randomly initialised tiny CLIP, saved once."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(tiny_arch)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def tiny_config(tiny_arch, tiny_clip_weights):
    from weclip import ModelConfig

    return ModelConfig(arch=tiny_arch, weights=str(tiny_clip_weights))


@pytest.fixture
def tiny_model(tiny_config):
    from weclip import ClassInfo, create_model

    torch.manual_seed(0)
    classes = ClassInfo("toy", ["cat", "dog", "car"], ["cat", "dog", "car"], ["grass", "sky"])
    return create_model(tiny_config, classes)


@pytest.fixture(scope="session")
def prefect_server():
    """A Prefect server for the session on a throwaway database; yields its API address, for
    the PREFECT_API_URL of the processes a test starts."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture
def file_server():
    """A local HTTP server on 127.0.0.1 that honours Range requests.

    Yields an object with ``url`` (base URL), ``files`` (path -> bytes to serve, e.g.
    ``files["/a.tar"] = data``) and ``ranges`` (the Range header of every request, or None).
    """
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    state = SimpleNamespace(files={}, ranges=[])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            data, byte_range = state.files.get(self.path), self.headers.get("Range")
            state.ranges.append(byte_range)
            if data is None:
                return self.send_error(404)
            start = int(byte_range.removeprefix("bytes=").rstrip("-")) if byte_range else 0
            if start >= len(data) > 0:
                return self.send_error(416)
            self.send_response(206 if byte_range else 200)
            if byte_range:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def toy_dataset(tmp_path):
    """Squares of two colours on grey: 6 train and 2 val images with masks, prepared under
    ``tmp_path``/prepared/toy; returns ``tmp_path``."""
    import numpy as np
    from PIL import Image

    from weclip.contract import ClassInfo, Record, write_dataset

    rng = np.random.default_rng(0)
    root = tmp_path / "prepared" / "toy"
    root.mkdir(parents=True)
    records = []
    for i in range(8):
        image = np.full((64, 64, 3), 128, np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        klass = 1 + i % 2
        y, x = rng.integers(0, 32, 2)
        image[y:y + 24, x:x + 24] = (200, 30, 30) if klass == 1 else (30, 30, 200)
        mask[y:y + 24, x:x + 24] = klass
        Image.fromarray(image).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}_mask.png")
        records.append(Record(str(i), root / f"{i}.png", root / f"{i}_mask.png",
                              "train" if i < 6 else "val", [klass]))
    write_dataset(root, ClassInfo("toy", ["red", "blue"], ["red square", "blue square"], ["grey"]), records)
    return tmp_path


@pytest.fixture
def toy_params(toy_dataset, tiny_arch, tiny_clip_weights):
    """``make(out, model=None, **train)``: params that train the tiny CLIP's WeCLIP on the toy
    dataset into ``out`` (6 iterations of batch 2, a checkpoint and an evaluation every 2),
    ``model`` and ``train`` keys overridden."""
    from pipeline.params import load_params

    def make(out, model=None, **train):
        overrides = {"data.dataset": "toy", "data.out": str(toy_dataset / "prepared"),
                     "model.arch": tiny_arch, "model.weights": str(tiny_clip_weights),
                     "model.decoder_dim": 32, "model.par_iters": 2, "train.out": str(out),
                     "train.split": "train", "train.iters": 6, "train.batch_size": 2,
                     "train.crop_size": 64, "train.workers": 0, "train.log_every": 1,
                     "train.checkpoint_every": 2, "train.eval_every": 2, "train.eval_images": 2,
                     "train.warmup_iters": 2}
        overrides.update({f"model.{k}": v for k, v in (model or {}).items()})
        overrides.update({f"train.{k}": v for k, v in train.items()})
        overrides.setdefault("train.rfm_start", overrides["train.iters"] // 2)
        return load_params(None, overrides)

    return make


@pytest.fixture
def photos(tmp_path):
    """A prepared dataset of 5 random photos of different sizes with image labels only (no
    masks), all in split train; returns its folder."""
    import numpy as np
    from PIL import Image

    from weclip.contract import ClassInfo, Record, write_dataset

    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        path = tmp_path / "data" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(path)
        records.append(Record(str(i), path, None, "train", [1 + i % 3]))
    write_dataset(tmp_path / "data", ClassInfo("toy", ["cat", "dog", "car"],
                                               ["cat", "dog", "car"], ["grass"]), records)
    return tmp_path / "data"


TINY_DINO = "weclip-test-tiny-dino"


@pytest.fixture(scope="session")
def tiny_dino_arch():
    """A tiny DINOv2 ViT (timm's ViT-S/14 class: patch 14, width 32, 2 blocks), known by name."""
    from weclip.model_configs import DINO_CONFIGS

    DINO_CONFIGS[TINY_DINO] = ("vit_small_patch14_dinov2",
                               dict(img_size=56, embed_dim=32, depth=2, num_heads=2))
    return TINY_DINO


@pytest.fixture(scope="session")
def tiny_dino_weights(tiny_dino_arch, tmp_path_factory):
    """The tiny DINOv2's random weights in the official DINOv2 release's format (timm's keys
    plus the mask token that timm's checkpoint filter drops)."""
    from weclip.dino import create_dino

    torch.manual_seed(1)
    state = {k: v + 0.02 * torch.randn_like(v)  # not the random weights of weights=None
             for k, v in create_dino(tiny_dino_arch, None).state_dict().items()}
    state["mask_token"] = torch.zeros(1, 32)
    path = tmp_path_factory.mktemp("dino") / "dinov2_tiny_pretrain.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def tiny_plus_model(tiny_config, tiny_dino_arch, tiny_dino_weights):
    """WeCLIP+ on the tiny CLIP and the tiny DINOv2, as the VOC recipe sets it."""
    from dataclasses import replace

    from weclip import ClassInfo, DinoConfig, create_model

    torch.manual_seed(0)
    classes = ClassInfo("toy", ["cat", "dog", "car"], ["cat", "dog", "car"], ["grass", "sky"])
    config = replace(tiny_config, dino=DinoConfig(tiny_dino_arch, str(tiny_dino_weights)),
                     cam_layer=-2, box_threshold=None)
    return create_model(config, classes)


@pytest.fixture
def plus_params(toy_params, tiny_dino_arch, tiny_dino_weights):
    """``make(out, **train)`` as ``toy_params``, for WeCLIP+ with the tiny DINOv2 and the VOC
    recipe's switches (RFM+ from the start, the Dice and cross-branch losses, self-training
    from iteration 4)."""
    def make(out, **train):
        train = {"dice_weight": 1.0, "cross_weight": 0.1, "self_training_start": 4,
                 "rfm_start": 0, **train}
        model = {"dino": {"arch": tiny_dino_arch, "weights": str(tiny_dino_weights)},
                 "cam_layer": -2, "box_threshold": None}
        return toy_params(out, model, **train)

    return make
