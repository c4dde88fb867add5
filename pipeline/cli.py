"""The `weclip` command line."""
from __future__ import annotations

import os

import typer

# No model hub can be reached from the machines this runs on by default; open_clip must not
# wait on one. A user with network access can export HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(help="WeCLIP: weakly supervised semantic segmentation on a frozen CLIP.",
                  no_args_is_help=True)


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
