"""The `weclip` command line: one command per pipeline stage, each running its Prefect flow.

A wrong parameter, a missing file or another error a user can fix ends a command with one
line, `error: <file or key>: <problem>`, and exit code 1; --verbose (or WECLIP_DEBUG=1) adds
the traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer
from typer.core import TyperGroup


def _debug() -> bool:
    return os.environ.get("WECLIP_DEBUG", "0") not in ("", "0")


class _Failed(RuntimeError):
    """A command's processes failed; the message says how."""


class _Commands(TyperGroup):
    """The commands, each of whose errors a user can fix ends as one line."""

    def invoke(self, ctx):
        from .stage import Stopped  # here, not at import: `weclip --help` needs no torch

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
    stages = logging.getLogger("pipeline")
    if not any(isinstance(h, _Console) for h in stages.handlers):
        stages.addHandler(_Console())
        stages.setLevel(logging.INFO)
        stages.propagate = False  # a library's root handler would print every line twice


class _Console(logging.StreamHandler):
    """The stages' log lines (figures, warnings) on the console, with the time: on the
    standard error of the moment (a test runner swaps it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s",
                                            "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


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


def _report(flow: str, params, tags: Optional[list[str]]) -> None:
    """Run the stage's flow of that name (pipeline/flows.py) on ``params`` and print what it
    returns. Imported here, after the params were checked: importing Prefect makes its home."""
    from . import flows

    typer.echo(getattr(flows, flow)(params, tags))


def _spread(stage: str, nproc: int, params_path: Path, overrides, tags, plain: Callable,
            flow: str, params) -> None:
    """A stage that may run as ``nproc`` processes: launch them (from the first), run the
    stage function ``plain`` without Prefect (ranks other than 0) or its ``flow`` (rank 0)."""
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch(stage, params_path, overrides, tags, nproc)
    elif int(os.environ.get("RANK", "0")) != 0:
        plain(params)
    else:
        _report(flow, params, tags)


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


@app.command()
def prepare(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
            tag: Optional[list[str]] = TagOption):
    """Prepare the dataset of `data.dataset` into the data contract."""
    _report("prepare_flow", _load(params, set_), tag)


@app.command()
def cache(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
          tag: Optional[list[str]] = TagOption):
    """Write the frozen CLIP's tokens and attention of the train split to zarr (resumable)."""
    from .cache import cache as plain

    p = _load(params, set_, ("model.weights", "cache.device"))
    _spread("cache", p.cache.nproc, params, set_, tag, plain, "cache_flow", p)


@app.command()
def train(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
          tag: Optional[list[str]] = TagOption):
    """Train WeCLIP (resumes from the run folder's checkpoint)."""
    from .train import train as plain

    p = _load(params, set_, ("model.weights", "model.dino.weights", "train.device"))
    _spread("train", p.train.nproc, params, set_, tag, plain, "train_flow", p)


@app.command("upper-bound")
def upper_bound(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
                tag: Optional[list[str]] = TagOption):
    """Train the same decoder on ground-truth masks (if `upper_bound.enabled`), for context."""
    _report("upper_bound_flow", _load(params, set_, ("model.weights", "model.dino.weights",
                                                     "train.device")), tag)


@app.command()
def infer(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
          tag: Optional[list[str]] = TagOption):
    """Segment `infer.split` with multi-scale + flip + DenseCRF (resumes per image)."""
    from .infer import infer as plain

    p = _load(params, set_, ("infer.device",))
    _spread("infer", p.infer.nproc, params, set_, tag, plain, "infer_flow", p)


@app.command()
def evaluate(params: Path = ParamsOption, set_: Optional[list[str]] = SetOption,
             tag: Optional[list[str]] = TagOption):
    """Score every step of the method; write reports/ (tables, metrics.json, plots)."""
    _report("evaluate_flow", _load(params, set_, ("infer.device",)), tag)


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
def recipe(name: str = typer.Argument(..., help="world, voc, coco, or WeCLIP+'s world-plus, "
                                                "voc-plus, coco-plus (a file of params/)"),
           out: Path = typer.Option(Path("params.yaml"), help="where to write it")):
    """Write params.yaml from a recipe of params/ over the defaults: `weclip recipe voc`."""
    from .params import write_recipe

    typer.echo(write_recipe(name, out))


def _pretrain(out: Path, work: Path, seed: int, n_pretrain: int, n_val: int, run) -> dict:
    """Draw a world with a pretrain split under ``work``, ``run(world)`` a pretraining that
    writes ``work``/weights.safetensors, copy those to ``out``; returns run's figures."""
    import shutil

    from weclip.files import write_atomically

    from .datasets.world import generate_world
    from .pretraining import WEIGHTS_FILE

    # Drawn afresh every time (about a minute): a world left by an older generator or other
    # settings would otherwise pass for the one asked for.
    world = generate_world(work / "world", seed=seed, n_pretrain=n_pretrain, n_train=0, n_val=n_val)
    metrics = run(world)
    write_atomically(out, lambda tmp: shutil.copyfile(work / WEIGHTS_FILE, tmp))
    metrics.pop("losses")
    return metrics


@app.command("pretrain-clip")
def pretrain_clip(out: Path = typer.Option(Path("weclip/pretrained/world-clip.safetensors"),
                                           help="where the weights go"),
                  seed: int = 0, n_pretrain: int = 10000, n_val: int = 500, steps: int = 900,
                  batch_size: int = 64, threads: int = 2,
                  attention_weight: float = typer.Option(
                      0.3, help="weight of the attention term (0: captions and regions only)"),
                  work: Path = typer.Option(Path("data/clip"), help="world and checkpoints")):
    """Pretrain the embedded world's small CLIP from scratch."""
    from .pretrain_clip import pretrain_clip as run

    metrics = _pretrain(out, work, seed, n_pretrain, n_val, lambda world: run(
        world, work, seed=seed, steps=steps, batch_size=batch_size, num_threads=threads,
        attention_weight=attention_weight))
    typer.echo(f"{out}: zero-shot {metrics}")


@app.command("pretrain-dino")
def pretrain_dino(out: Path = typer.Option(Path("weclip/pretrained/world-dino.safetensors"),
                                           help="where the weights go"),
                  seed: int = 0, n_pretrain: int = 10000, n_val: int = 500, steps: int = 600,
                  batch_size: int = 32, lr: float = 1e-3, threads: int = 2,
                  work: Path = typer.Option(Path("data/dino"), help="world and checkpoints")):
    """Pretrain the embedded world's small DINOv2 ViT for WeCLIP+ from scratch (DINO + iBOT,
    no labels)."""
    from .pretrain_dino import pretrain_dino as run

    metrics = _pretrain(out, work, seed, n_pretrain, n_val, lambda world: run(
        world, work, seed=seed, steps=steps, batch_size=batch_size, lr=lr, num_threads=threads))
    figures = {k: round(metrics[k]["purity"], 3) for k in ("pretrained", "untrained")}
    typer.echo(f"{out}: patch k-NN purity {figures}, chance "
               f"{metrics['pretrained']['chance']:.3f}")


@app.command()
def ui():
    """Serve the Prefect UI on this folder's runs (.prefect/) at http://127.0.0.1:4200, unless a
    server already answers there; Ctrl-C stops it."""
    from .prefect_env import ui as serve_ui

    raise typer.Exit(serve_ui())


@app.command()
def benchmark(arch: str = "ViT-B-16", batch: int = 4, crop: int = 320,
              device: str = typer.Option(None, help="cpu or cuda (default: cuda if present)"),
              steps: int = 10, warmup: int = 2, amp: bool = False,
              compile: bool = typer.Option(False, "--compile", help="torch.compile the parts"),
              long_side: int = 512, infer_images: int = 5,
              dino: Optional[str] = typer.Option(None, help="a DINOv2 arch: WeCLIP+ "
                                                 "(e.g. vit_small_patch14_dinov2)"),
              json_out: Optional[Path] = typer.Option(None, "--json", help="also write the "
                                                      "figures to this JSON file")):
    """Print the training step's time per phase, launched ops, host syncs, peak memory and
    inference images/s (random weights)."""
    import json

    from weclip.benchmark import run_benchmark

    figures = run_benchmark(arch, batch=batch, crop=crop, device=device, steps=steps,
                            warmup=warmup, amp=amp, compile=compile, long_side=long_side,
                            infer_images=infer_images, dino=dino)
    for key, value in figures.items():
        typer.echo(f"{key:>40}: {value}")
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    app()
