#!/usr/bin/env bash
# The GPU runs behind docs/performance.md, each one device call (< 10 min):
#   bash benchmarks/gpu_runs.sh train   one H100: Medium (h100, t4 profiles) and Large (h100) through `sd35hub train`
#                                       with GPU busy and top kernels (run 7)
#   bash benchmarks/gpu_runs.sh ddp     kind nvidia-h100-x2: 1 vs 2 GPUs at global batch 4, then the Medium bench (run 8)
#   bash benchmarks/gpu_runs.sh ddp8    kind nvidia-h100-x2: 1 vs 2 GPUs at global batch 8; T4-profile host profile (run 9)
#   bash benchmarks/gpu_runs.sh next    one H100, ~6 min: Medium busy after the no-drain log points, the T4 fp16 +
#                                       grad-scaler path (an H100 forced to the t4 profile uses bf16), the compile cache
#   bash benchmarks/gpu_runs.sh buckets ["dynamic static fill"]   one H100, ~3 min each: three aspect buckets
#                                       (dynamic vs static compile, partial batches filled, CUDA graphs per shape,
#                                       validation in the middle of CUDA-graphed training)
#   bash benchmarks/gpu_runs.sh fp8     one H100, ~8 min: same-run bench of the FP8 base (carry .whl and .whlx, the
#                                       torchao wheel); fp8-train: Large bf16 vs FP8 loss curves through `sd35hub train`
#   bash benchmarks/gpu_runs.sh confirm one H100 (kind nvidia-h100-x1), ~8 min: Medium busy, Large FP8 bench, 3 buckets
#   bash benchmarks/gpu_runs.sh trace   one H100, ~4 min: top kernels of the Large step, bf16 and FP8
# The bench-only runs (1-3, 6) are single gpu_bench.py commands, listed in docs/performance.md.
# Device-tool usage: carry .whl (../shared/device/pack-wheels.sh output); the FP8 modes (fp8, fp8-train,
# confirm, trace) also carry .whlx, holding the torchao wheel (`pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whlx torchao==0.18.0`). Results land in $OUT
# as JSON; copy them to benchmarks/results/ and update docs/performance.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 SD35HUB_CACHE=/tmp/sdc OUT=${OUT:-/tmp/out}
TWO_GPUS="accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
quiet() { grep -v -i -E "warn|torchvision|^W1|Loading|Writing"; }
# one `sd35hub train` run: e2e SECONDS ARGS...; LAUNCH (default python3) and DATA (default /tmp/sq) from the environment
e2e() {
  local limit=$1; shift
  timeout "$limit" ${LAUNCH:-python3} benchmarks/train_e2e.py --out "$OUT" "$@" data.source="${DATA:-/tmp/sq}" 2>&1 \
    | quiet | grep -v -E '^\s+("name"|"calls"|"ms_per_step"|\{|\},?)' | tail -40
}
# the same global batch on 1 GPU and on 2: ddp_pair STEPS NAME_1GPU BATCH_1GPU NAME_2GPU BATCH_PER_GPU
ddp_pair() {
  e2e 200 --model-dir /tmp/rm --profile h100 --steps "$1" --window 8 --name "$2" train.batch_size="$3"
  LAUNCH="$TWO_GPUS" e2e 240 --model-dir /tmp/rm --profile h100 --steps "$1" --window 8 --name "$4" train.batch_size="$5"
}
# torchao (model.float8) from .whlx, for the FP8 modes only
with_torchao() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whlx/*.whl || exit 1
}
python3 benchmarks/square_dataset.py /tmp/sq 34 >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/random_model.py medium /tmp/rm | tail -1
case "${1:-train}" in
  train)
    e2e 150 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_h100
    e2e 130 --model-dir /tmp/rm --profile t4 --steps 8 --window 4 --name medium_t4
    python3 benchmarks/random_model.py large /tmp/rl | tail -1
    e2e 220 --model-dir /tmp/rl --profile h100 --steps 20 --window 8 --name large_h100
    ;;
  ddp)
    # #9 part 5: global batch 4 (1 GPU x batch 4 vs 2 GPUs x batch 2; both with CUDA graphs); then the same-run bench
    ddp_pair 24 medium_1gpu 4 medium_2gpu 2
    timeout 200 python3 benchmarks/gpu_bench.py --out "$OUT/bench" --models medium --variants ref,h100 --steps 10 2>&1 | quiet | tail -4
    ;;
  ddp8)
    # the H100 profile's own per-GPU batch (4): global batch 8; then where the T4-profile step spends host time
    ddp_pair 20 medium_1gpu_b8 8 medium_2gpu_b4 4
    e2e 130 --model-dir /tmp/rm --profile t4 --steps 8 --window 3 --name medium_t4_host --cpu-profile
    ;;
  next)
    e2e 150 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_h100_nodrain
    e2e 150 --model-dir /tmp/rm --profile t4 --steps 12 --window 4 --name medium_t4_fp16 \
      train.mixed_precision=fp16 model.dtype=fp16
    timeout 200 python3 benchmarks/compile_cache.py --model medium 2>&1 | quiet | tail -3
    ;;
  buckets)
    # three aspect buckets (two token counts) with validation in the middle of CUDA-graphed training; variants
    # (default all): dynamic = the blocks' automatic dynamic shapes (what `auto` picks past 2 shapes), static =
    # one graph per (token count, batch size), fill = partial batches filled (one batch size) -> 2 static shapes
    python3 benchmarks/square_dataset.py /tmp/mix 36 --aspects 1,1.5,0.67 >/dev/null
    for v in ${2:-dynamic static fill}; do
      case $v in
        dynamic) extra=(train.compile_shapes=dynamic) ;;
        static) extra=(train.compile_shapes=static) ;;
        fill) extra=(data.partial_batches=fill) ;;
      esac
      DATA=/tmp/mix e2e 240 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name "medium_3buckets_$v" \
        train.validation_every=15 "${extra[@]}"
      rm -rf "$OUT/medium_3buckets_$v"
    done
    ;;
  fp8)
    # FP8 base layers (torchao float8, carried in .whlx): the same-run bench, reference vs bf16 vs FP8
    with_torchao
    timeout 560 python3 benchmarks/gpu_bench.py --out "$OUT/bench" --models large,medium --variants ref,h100,h100-fp8 \
      --steps 8 2>&1 | quiet | grep -v Traceback | tail -30
    ;;
  fp8-train)
    # the loss curve with FP8 base layers: Large through `sd35hub train`, bf16 then FP8, same seed and data
    with_torchao
    python3 benchmarks/random_model.py large /tmp/rl | tail -1
    e2e 240 --model-dir /tmp/rl --profile h100 --steps 30 --window 8 --name large_bf16 train.log_every=1
    e2e 240 --model-dir /tmp/rl --profile h100 --steps 30 --window 8 --name large_fp8 train.log_every=1 model.float8=true
    for n in large_bf16 large_fp8; do cp "$OUT/$n/logs/metrics.jsonl" "$OUT/$n.metrics.jsonl"; rm -rf "${OUT:?}/$n"; done
    ;;
  confirm)
    # the H200 results of 2026-11-26 again on an H100 (the card): Medium busy, Large FP8, 3 buckets
    with_torchao
    e2e 150 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_h100_confirm
    timeout 260 python3 benchmarks/gpu_bench.py --out "$OUT/bench" --models large --variants ref,h100,h100-fp8 \
      --steps 8 2>&1 | quiet | grep -v Traceback | tail -6
    python3 benchmarks/square_dataset.py /tmp/mix 36 --aspects 1,1.5,0.67 >/dev/null
    DATA=/tmp/mix e2e 200 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_3buckets_confirm \
      train.validation_every=15
    rm -rf "${OUT:?}/medium_h100_confirm" "${OUT:?}/medium_3buckets_confirm"
    ;;
  trace)
    # where the Large step's time goes, bf16 and FP8 base (kernel time per step, top 25 kernels)
    with_torchao
    timeout 400 python3 benchmarks/gpu_bench.py --out "$OUT/trace" --models "" --trace large:h100,large:h100-fp8 2>&1 \
      | quiet | grep -v Traceback | tail -60
    ;;
  *) echo "usage: bash benchmarks/gpu_runs.sh train|ddp|ddp8|next|buckets|fp8|fp8-train|confirm|trace" >&2; exit 2 ;;
esac
