#!/usr/bin/env bash
# The GPU checks, in one command, for the first machine with an NVIDIA GPU (each step is capped; the caps add up
# to 6 minutes, so the whole check fits one H100/H200 with time to rerun it):
#   1. facts: the GPU's sm_XY, the precision `auto` picks, the torch and DALI kernel checks, the MFU peak
#   2. data: real-photo shards and the embedded digits, made with `python -m data_prep`
#   3. steps: ZeRO 0/2/3 x fp32/bf16/fp16 on real engines: first step against fp32's, a non-finite loss kept
#      from the weights, host reads and synchronizing CUDA calls of our code in a micro step (none at ZeRO-2)
#   4. DALI `mixed` (nvJPEG) against DALI CPU on the same crops: mean absolute pixel difference (bounded), img/s
#   5. Swin-B 224 bf16 through the engine (1 rank, cpu:gloo,cuda:nccl, ZeRO-2) against a plain PyTorch loop:
#      img/s, MFU of each (swin_common.gpu's peak table), ratio
#   6. the tiny recipe in fp16 with dynamic loss scaling at ZeRO-2 (DeepSpeed's scaler) and ZeRO-0 (autocast's
#      GradScaler): it runs, the loss falls, the scale is logged
#   7. pytest -m gpu: the GPU tier of the tests (they skip with a reason on CPU)
# Every figure is one line `name: value`. Exit 0 only if every step passed.
#
# usage: bash bench/gpu_check.sh [--dry-run]
#   --dry-run   lists what it would run and checks, on any machine, that every command it needs is there
# environment: PYTHON (default .venv/bin/python), TMPDIR (scratch; removed at the end)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
case "${1:-}" in
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --dry-run) dry=1 ;;
  "") dry=0 ;;
  *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
esac
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"
trap 'rm -rf "$work"' EXIT
failed=()

budget=360  # seconds: the caps of all steps together may not exceed it
capped=0
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, or in a dry run says it would
  local name="$1" limit="$2"
  shift 2
  capped=$((capped + limit))
  if [ "$dry" = 1 ]; then
    echo "would run [$name] (at most ${limit}s): $*"
    return 0
  fi
  echo "== $name" >&2
  local t0=$SECONDS
  if ! timeout "$limit" "$@"; then
    failed+=("$name")
    echo "step_failed: $name" >&2
  fi
  echo "${name}_seconds: $((SECONDS - t0))"
}

if [ "$dry" = 0 ] && ! "$python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "error: no CUDA device visible to $python (nvidia-smi; CUDA_VISIBLE_DEVICES); --dry-run works anywhere" >&2
  exit 2
fi
[ "$dry" = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'

step facts 10 "$python" bench/gpu_check.py facts
step data 40 "$python" bench/gpu_check.py data "$work" --images 1000
step steps 45 "$python" bench/gpu_check.py steps
step dali_mixed_vs_cpu 30 "$python" bench/gpu_check.py dali "$work/photos" --compare-batches 4
step swin_b_bf16_engine_vs_plain 50 "$python" bench/train_throughput.py --arch swin_base --img-size 224 \
  --window 7 --batch 64 --precision bf16 --zero-stage 2 --rounds 7 --classes 21841 --memory-worlds ""
for stage in 2 0; do
  step "tiny_fp16_zero$stage" 35 "$python" -m pipeline.train --config configs/tiny_22k.yaml name="fp16_zero$stage" \
    out_dir="$work/runs" data.shards="$work/digits" train.precision=fp16 train.zero_stage=$stage \
    tracking.enabled=false train.log_every=5 schedule.epochs=3
  step "tiny_fp16_zero${stage}_figures" 5 "$python" bench/gpu_check.py fp16 "$work/runs/fp16_zero$stage"
done
step pytest_gpu 105 "$python" -m pytest -m gpu -q -p no:cacheprovider tests

if [ "$dry" = 1 ]; then  # everything a real run calls is there and starts
  for cmd in "bench/gpu_check.py --help" "bench/train_throughput.py --help" "-m pipeline.train --help" \
             "tests/precision_probe.py 2:bf16"; do
    # shellcheck disable=SC2086
    "$python" $cmd >/dev/null || { echo "error: $python $cmd failed" >&2; exit 1; }
  done
  gpu_tests="$("$python" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests 2>/dev/null | grep -c '::')"
  command -v timeout >/dev/null || { echo "error: timeout(1) not found" >&2; exit 1; }
  [ "$capped" -le "$budget" ] || { echo "error: the steps' caps add up to ${capped}s, over ${budget}s" >&2; exit 1; }
  echo "dry run: OK, $gpu_tests GPU-tier tests collected, steps capped at ${capped}s in all (budget ${budget}s)"
  exit 0
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: OK"
