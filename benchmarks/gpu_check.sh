#!/usr/bin/env bash
# The first thing to run on a GPU (docs/scaling.md): the CUDA tests, the benchmark in float32 and
# bfloat16, eager and compiled (and WeCLIP+ with DINOv2 ViT-S/14 in bfloat16), and a world
# training killed after iteration 15 and resumed; then one summary, DIR/summary.md. About 9
# minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--out DIR] [--arch A] [--crop N] [--steps N]
#
# The dry run on a CPU: --device cpu --arch ViT-Tiny-8-128 --crop 128 --steps 2 (the CUDA tests
# skip themselves). PYTHON picks the interpreter (default python3). Each step's output is in
# DIR/<step>.log; the exit code is 1 if any step failed.
set -uo pipefail
device=cuda out=gpu_check arch=ViT-B-16 crop=320 steps=10
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2 ;; --out) out=$2 ;; --arch) arch=$2 ;; --crop) crop=$2 ;;
    --steps) steps=$2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--out DIR] [--arch A] [--crop N] [--steps N]" >&2
       exit 2 ;;
  esac
  shift 2
done
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p "$out"
: > "$out/steps.tsv"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, summarise so far
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  [ $code -eq 0 ] || failed=1
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" >> "$out/steps.tsv"
  echo "   exit code $code, $((SECONDS - start)) s"
  "$python" benchmarks/gpu_summary.py "$out" > "$out/summary.md"
}

bench() {  # bench NAME SECONDS FLAGS...
  local name=$1
  local limit=$2
  shift 2
  step "$name" "$limit" "$python" -m pipeline.cli benchmark --device "$device" --arch "$arch" \
    --crop "$crop" --steps "$steps" --warmup 3 --json "$out/$name.json" "$@"
}

step cuda-tests 150 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
bench bench-fp32-eager 90
bench bench-bf16-eager 90 --amp
step resume 120 "$python" benchmarks/resume_check.py --device "$device" --out "$out/resume"
bench bench-fp32-compiled 150 --compile
bench bench-bf16-compiled 150 --amp --compile
bench bench-plus-bf16-eager 90 --amp --dino vit_small_patch14_dinov2
cat "$out/summary.md"
exit $failed
