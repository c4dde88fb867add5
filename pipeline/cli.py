"""The `weclip` command line: one command per pipeline stage, each running a Prefect flow.

A wrong parameter, a missing file or another error a user can fix ends a command with one
line, `error: <file or key>: <problem>`, and exit code 1; --verbose (or WECLIP_DEBUG=1) adds
the traceback.
"""
from __future__ import annotations

import logging
import os
import re
import traceback
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

# No model hub can be reached from the machines this runs on by default; open_clip must not
# wait on one. A user with network access can export HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _debug() -> bool:
    return os.environ.get("WECLIP_DEBUG", "0") not in ("", "0")


class _Failed(RuntimeError):
    """A command's processes failed; the message says how."""


class _Commands(TyperGroup):
    """The commands, each of whose errors a user can fix ends as one line."""

    def invoke(self, ctx):
        from .common import Stopped  # here, not at import: `weclip --help` needs no torch

        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, Stopped, _Failed) as e:
            if _debug():
                traceback.print_exc()
            # The system's own OSError keeps the file apart from the problem.
            message = f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else e
            if _ERRORS in os.environ and "RANK" in os.environ:
                # A process of _launch, which reports the first failure.
                Path(os.environ[_ERRORS], f"rank-{os.environ['RANK']}").write_text(str(message))
            else:
                typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None


# The folder where the processes of _launch leave their error lines.
_ERRORS = "WECLIP_ERRORS"

app = typer.Typer(cls=_Commands, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="show an error's traceback (or set WECLIP_DEBUG=1)")):
    """WeCLIP: weakly supervised semantic segmentation on a frozen CLIP."""
    if verbose:
        os.environ["WECLIP_DEBUG"] = "1"  # for the processes a command starts too


ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="the parameters file")
SetOption = typer.Option(None, "--set", "-S", help="override a parameter: -S train.iters=100")
TagOption = typer.Option(None, "--tag", help="extra Prefect tags for the run")


def _load(params_path: Optional[Path], overrides: Optional[list[str]], needs=()):
    """The checked parameters; ``needs``: the keys whose file or device the command uses."""
    import yaml

    from .params import load_params

    values = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        values[key] = yaml.safe_load(value)
        if isinstance(values[key], str) and _EXPONENT.fullmatch(values[key]):
            values[key] = float(values[key])  # YAML 1.1 reads 2e-4 (no dot) as a string
    return load_params(params_path, values, needs)


_EXPONENT = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+")


# The stages that run across processes (`<stage>.nproc` of them); each is the function of its
# name in the module of its name, which a rank other than 0 runs without Prefect.
DISTRIBUTED = ("cache", "train", "infer")


def _run(stage: str, params, tags: Optional[list[str]]):
    """Run a stage's flow of pipeline.flows with Prefect configured, tagged with the stage and
    any DVC experiment name; on a rank other than 0, the stage function alone."""
    if int(os.environ.get("RANK", "0")) != 0:
        import importlib

        return getattr(importlib.import_module(f"pipeline.{stage}"), stage)(params)
    from .prefect_env import configure

    configure()
    from prefect import tags as prefect_tags

    from . import flows

    if not _debug():
        # Prefect logs a failed run's traceback to its API and, through the root logger's
        # handler, to the console, where the one-line error replaces it.
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: not (r.exc_info and r.name.startswith("prefect.")))

    run_tags = [f"stage:{stage}", *(tags or [])]
    if os.environ.get("DVC_EXP_NAME"):
        run_tags.append(f"dvc-exp:{os.environ['DVC_EXP_NAME']}")
    with prefect_tags(*run_tags):
        try:
            return getattr(flows, stage.replace("-", "_") + "_flow")(params)
        except Exception:
            # Prefect logs its shutdown (the temporary server's) at exit, after the error line.
            logging.disable()
            raise


def _launch(stage: str, params_path: Path, overrides, tags, nproc: int) -> None:
    """Run this command again as ``nproc`` processes under torch's launcher. A failure ends in
    one error line: the first failed process's own, or its exit code when it left none."""
    import tempfile

    from .distributed import launch

    argv = ["pipeline.cli", stage, "--params", str(params_path)]
    argv += [a for item in overrides or [] for a in ("-S", item)]
    argv += [a for tag in tags or [] for a in ("--tag", tag)]
    with tempfile.TemporaryDirectory() as errors:
        os.environ[_ERRORS] = errors
        try:
            failed = launch(nproc, argv, quiet=not _debug())
        finally:
            del os.environ[_ERRORS]
        reports = sorted(Path(errors).iterdir(), key=lambda p: p.stat().st_mtime_ns)
        if reports:
            raise _Failed(reports[0].read_text())
    if failed:
        rank = min(failed)
        raise _Failed(f"process {rank} of {nproc} ended with exit code {failed[rank]} (its "
                      "output is above)")


# What of this machine each stage uses, checked before it starts (see pipeline.params.PRESENCE).
NEEDS = {
    "cache": ("model.weights", "cache.device"),
    "train": ("model.weights", "train.device"),
    "upper-bound": ("model.weights", "train.device"),
    "infer": ("infer.device",),
    "evaluate": ("infer.device",),
}

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
        p = _load(params, set_, NEEDS.get(stage, ()))
        nproc = getattr(p, stage).nproc if stage in DISTRIBUTED else 1
        if nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _launch(stage, params, set_, tag, nproc)
        result = _run(stage, p, tag)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(result)

    command.__doc__ = help_text
    return command


for _stage, _help in STAGES.items():
    app.command(_stage)(_stage_command(_stage, _help))


@app.command()
def predict(images: list[Path] = typer.Argument(..., help="image files to segment"),
            model: Path = typer.Option(Path("runs/train/model.pt"), help="a trained model.pt"),
            out: Path = typer.Option(Path("predictions"), help="folder for the PNGs"),
            params: Optional[Path] = typer.Option(
                None, "--params", "-p", help="a params file whose `infer` settings to use "
                "(default: the built-in multi-scale + flip + CRF settings)"),
            set_: Optional[list[str]] = SetOption):
    """Segment images with a trained model, from any folder: a palette mask and an overlay PNG
    per image."""
    from .infer import predict_files

    for path in predict_files(model, images, out, _load(params, set_, ("infer.device",)).infer):
        typer.echo(path)


@app.command()
def recipe(name: str = typer.Argument(..., help="world, voc or coco (a file of params/)"),
           out: Path = typer.Option(Path("params.yaml"), help="where to write it")):
    """Write params.yaml from a recipe of params/ over the defaults: `weclip recipe voc`."""
    from .params import write_recipe

    typer.echo(write_recipe(name, out))


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
def ui():
    """Serve the Prefect UI on this folder's runs (.prefect/) at http://127.0.0.1:4200, unless a
    server already answers there; Ctrl-C stops it."""
    from .prefect_env import ui as serve_ui

    raise typer.Exit(serve_ui())


@app.command()
def benchmark(arch: str = "ViT-B-16", batch: int = 4, crop: int = 320,
              device: str = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
              steps: int = 10, warmup: int = 2, amp: bool = False, long_side: int = 512,
              infer_images: int = 5):
    """Print the training step's time per phase, its peak memory and inference images/s
    (random weights)."""
    from weclip.benchmark import run_benchmark

    run_benchmark(arch, batch=batch, crop=crop, device=device, steps=steps, warmup=warmup,
                  amp=amp, long_side=long_side, infer_images=infer_images)


if __name__ == "__main__":
    app()
