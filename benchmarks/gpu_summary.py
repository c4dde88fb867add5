"""The summary of benchmarks/gpu_check.sh's folder as markdown: the machine, each step's exit
code and time, the benchmarks side by side, the resume check.

    python benchmarks/gpu_summary.py gpu_check > gpu_check/summary.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = (("device", "device"), ("torch", "torch"), ("train_iters_per_s", "it/s"),
        ("train_step_s", "step (s)"), ("train_peak_memory_mb", "peak memory (MB)"),
        ("launches_per_step", "launched ops per step"), ("syncs_per_step", "host syncs per step"),
        ("cuda_kernels_per_step", "GPU kernels per step"),
        ("infer_images_per_s", "inference (img/s, MS + flip)"))


def main(folder: Path) -> None:
    print(f"# GPU check: {folder}\n\n| step | exit code | seconds |\n|---|---|---|")
    steps = folder / "steps.tsv"
    for line in steps.read_text().splitlines() if steps.exists() else []:
        print("| " + " | ".join(line.split("\t")) + " |")
    benches = {p.stem.removeprefix("bench-"): json.loads(p.read_text())
               for p in sorted(folder.glob("bench-*.json"))}
    if benches:
        first = next(iter(benches.values()))
        print(f"\n## Benchmark: {first['arch']}, batch {first['batch']}, crop {first['crop']}\n")
        print("| | " + " | ".join(benches) + " |\n|---|" + "---|" * len(benches))
        for key, label in ROWS + tuple((k, k) for k in first if k.startswith("phase_ms.")):
            print(f"| {label} | " + " | ".join(str(b.get(key, "-")) for b in benches.values()) + " |")
    resume = folder / "resume" / "resume.json"
    if resume.exists():
        print("\n## Resume check\n\n```json\n" + resume.read_text().strip() + "\n```")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
