#!/usr/bin/env bash
# The GPU measurements issues #5 and #9 still need (docs/performance.md says which ran).
# Device-tool usage (.whl = ../shared/device/pack-wheels.sh output, carried):
#   single GPU:  bash benchmarks/remaining_gpu_runs.sh single      (~8 min on an H100)
#   two GPUs:    bash benchmarks/remaining_gpu_runs.sh ddp         (kind nvidia-h100-x2, ~6 min)
# Results land in $OUT as JSON; copy them to benchmarks/results/ and update docs/performance.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 SD35HUB_CACHE=/tmp/sdc OUT=${OUT:-/tmp/out}
quiet() { grep -v -i -E "warn|torchvision|^W1|Loading|Writing"; }
python3 benchmarks/square_dataset.py /tmp/sq 34 >/dev/null
case "${1:-single}" in
  single)
    # #9 part 3: Medium 16 GB profile speed (0.492 s measured with checkpointing on every block)
    timeout 200 python3 benchmarks/gpu_bench.py --out "$OUT/bench" --models medium --variants t4,t4-ckpt2 --steps 6 2>&1 | quiet | tail -6
    # #5: Large with the H100 profile, Medium with the T4 profile, through `sd35hub train`; #9 part 4: GPU busy
    python3 benchmarks/random_model.py large /tmp/rl | tail -1
    timeout 200 python3 benchmarks/train_e2e.py --model-dir /tmp/rl --profile h100 --steps 20 --window 8 \
      --out "$OUT" --name large_h100 data.source=/tmp/sq 2>&1 | quiet | tail -25
    rm -rf /tmp/rl
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    timeout 150 python3 benchmarks/train_e2e.py --model-dir /tmp/rm --profile t4 --steps 8 --window 4 \
      --out "$OUT" --name medium_t4 data.source=/tmp/sq 2>&1 | quiet | tail -25
    ;;
  ddp)
    # #9 part 5: samples/s on 2 GPUs vs 1, same global batch of 4 (1 GPU x batch 4 vs 2 GPUs x batch 2; both with CUDA graphs)
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    timeout 170 python3 benchmarks/train_e2e.py --model-dir /tmp/rm --profile h100 --steps 24 --window 8 \
      --out "$OUT" --name medium_1gpu data.source=/tmp/sq train.batch_size=4 2>&1 | quiet | tail -25
    timeout 200 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
      benchmarks/train_e2e.py --model-dir /tmp/rm --profile h100 --steps 24 --window 8 \
      --out "$OUT" --name medium_2gpu data.source=/tmp/sq train.batch_size=2 2>&1 | quiet | tail -40
    ;;
esac
