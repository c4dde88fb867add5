"""The `weclip` command line: one command per pipeline stage, each running a Prefect flow."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

# No model hub can be reached from the machines this runs on by default; open_clip must not
# wait on one. A user with network access can export HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(help="WeCLIP: weakly supervised semantic segmentation on a frozen CLIP.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="the parameters file")
SetOption = typer.Option(None, "--set", "-S", help="override a parameter: -S train.iters=100")
TagOption = typer.Option(None, "--tag", help="extra Prefect tags for the run")


def _load(params_path: Path, overrides: Optional[list[str]]):
    import yaml

    from .params import load_params

    values = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: expected key=value")
        values[key] = yaml.safe_load(value)
    return load_params(params_path, values)


def _run(flow_name: str, params, tags: Optional[list[str]]):
    """Run a flow of pipeline.flows with Prefect configured, tagged with the stage and any DVC
    experiment name."""
    from .prefect_env import configure

    configure()
    from prefect import tags as prefect_tags

    from . import flows

    run_tags = [f"stage:{flow_name.removesuffix('_flow')}", *(tags or [])]
    if os.environ.get("DVC_EXP_NAME"):
        run_tags.append(f"dvc-exp:{os.environ['DVC_EXP_NAME']}")
    with prefect_tags(*run_tags):
        return getattr(flows, flow_name)(params)


STAGES = {
    "prepare": "Prepare the dataset of `data.dataset` into the data contract.",
    "cache": "Write the frozen CLIP's tokens and attention of the train split to zarr (resumable).",
    "train": "Train WeCLIP (resumes from the run folder's checkpoint).",
    "upper-bound": "Train the same decoder on ground-truth masks (if `upper_bound.enabled`), for context.",
    "infer": "Segment `infer.split` with multi-scale + flip + DenseCRF (resumes per image).",
    "evaluate": "Score every step of the method; write reports/ (tables, metrics.json, plots).",
}


def _stage_command(stage: str, help_text: str):
    def command(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
                tag: Optional[list[str]] = TagOption):
        typer.echo(_run(stage.replace("-", "_") + "_flow", _load(params, set_), tag))

    command.__doc__ = help_text
    return command


for _stage, _help in STAGES.items():
    app.command(_stage)(_stage_command(_stage, _help))


@app.command()
def predict(images: list[Path] = typer.Argument(..., help="image files to segment"),
            out: Path = typer.Option(Path("predictions"), help="folder for the PNGs"),
            model: Optional[Path] = typer.Option(None, help="model.pt (default: train.out's)"),
            params: Path = ParamsOption, set_: Optional[list[str]] = SetOption):
    """Segment images outside any dataset: a palette mask and an overlay PNG per image."""
    from .infer import predict_files

    p = _load(params, set_)
    model = model or Path(p.train.out) / "model.pt"
    if not model.exists():
        raise typer.BadParameter(f"{model}: no trained model (run `weclip train` or pass --model)")
    for path in predict_files(p, model, images, out):
        typer.echo(path)


@app.command("pretrain-clip")
def pretrain_clip(out: Path = typer.Option(Path("weclip/pretrained/world-clip.safetensors"),
                                           help="where the weights go"),
                  seed: int = 0, n_pretrain: int = 10000, n_val: int = 500, steps: int = 900,
                  batch_size: int = 64, threads: int = 2,
                  attention_weight: float = typer.Option(
                      0.3, help="weight of the attention term (0: captions and regions only)"),
                  work: Path = typer.Option(Path("data/clip"), help="world and checkpoints")):
    """Pretrain the embedded world's small CLIP from scratch (about 16 min on 2 CPU cores)."""
    import shutil

    from weclip.files import write_atomically

    from .datasets.world import generate_world
    from .pretrain_clip import WEIGHTS_FILE, pretrain_clip as run

    # Drawn afresh every time (about a minute): a world left by an older generator or other
    # settings would otherwise pass for the one asked for.
    world = generate_world(work / "world", seed=seed, n_pretrain=n_pretrain, n_train=0, n_val=n_val)
    metrics = run(world, work, seed=seed, steps=steps, batch_size=batch_size, num_threads=threads,
                  attention_weight=attention_weight)
    write_atomically(out, lambda tmp: shutil.copyfile(work / WEIGHTS_FILE, tmp))
    metrics.pop("losses")
    typer.echo(f"{out}: zero-shot {metrics}")


@app.command()
def benchmark(arch: str = "ViT-B-16", batch: int = 4, crop: int = 320,
              device: str = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
              steps: int = 10, warmup: int = 2, amp: bool = False, long_side: int = 512,
              infer_images: int = 5):
    """Print training-step time, peak memory and inference images/s (random weights)."""
    from weclip import benchmark as bench

    argv = ["--arch", arch, "--batch", str(batch), "--crop", str(crop), "--steps", str(steps),
            "--warmup", str(warmup), "--long-side", str(long_side),
            "--infer-images", str(infer_images)] + (["--device", device] if device else [])
    bench.main(argv + (["--amp"] if amp else []))


if __name__ == "__main__":
    app()
