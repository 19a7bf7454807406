#!/usr/bin/env bash
# The GPU runs behind docs/performance.md, each one device call (< 10 min):
#   bash benchmarks/gpu_runs.sh train   one H100: Medium (h100, t4 profiles) and Large (h100) through `sd35hub train`
#                                       with GPU busy and top kernels (run 7)
#   bash benchmarks/gpu_runs.sh e2e     one H100: Medium h100 + t4 through `sd35hub train`, then the Medium 16 GB-profile
#                                       bench (checkpointing every block / every 2nd block) (run 6)
#   bash benchmarks/gpu_runs.sh large   one H100: Large h100 through `sd35hub train`, same-run bench reference vs ours
#   bash benchmarks/gpu_runs.sh ddp     kind nvidia-h100-x2: 1 vs 2 GPUs at global batch 4, then the Medium bench (run 8)
#   bash benchmarks/gpu_runs.sh ddp8    kind nvidia-h100-x2: 1 vs 2 GPUs at global batch 8; T4-profile host profile (run 9)
#   bash benchmarks/gpu_runs.sh next    one H100, ~9 min: what is not measured yet — Medium busy after the no-drain log points, compile cache, three buckets,
#                                       and the T4 fp16 + grad-scaler path (an H100 forced to the t4 profile uses bf16)
# Device-tool usage: carry .whl (../shared/device/pack-wheels.sh output). Results land in $OUT as JSON;
# copy them to benchmarks/results/ and update docs/performance.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 SD35HUB_CACHE=/tmp/sdc OUT=${OUT:-/tmp/out}
quiet() { grep -v -i -E "warn|torchvision|^W1|Loading|Writing"; }
e2e() { timeout "$1" python3 benchmarks/train_e2e.py --out "$OUT" "${@:2}" data.source=/tmp/sq 2>&1 | quiet \
          | grep -v -E '^\s+("name"|"calls"|"ms_per_step"|\{|\},?)' | tail -30; }
python3 benchmarks/square_dataset.py /tmp/sq 34 >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-e2e}" in
  e2e)
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    e2e 170 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_h100
    e2e 150 --model-dir /tmp/rm --profile t4 --steps 8 --window 4 --name medium_t4
    timeout 180 python3 benchmarks/gpu_bench.py --out "$OUT/bench_t4" --models medium --variants t4,t4-ckpt2 --steps 6 2>&1 | quiet | tail -4
    ;;
  train)
    # all three `sd35hub train` runs (after the recompile-limit fix), no bench
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    e2e 150 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_h100
    e2e 130 --model-dir /tmp/rm --profile t4 --steps 8 --window 4 --name medium_t4
    python3 benchmarks/random_model.py large /tmp/rl | tail -1
    e2e 220 --model-dir /tmp/rl --profile h100 --steps 20 --window 8 --name large_h100
    ;;
  large)
    python3 benchmarks/random_model.py large /tmp/rl | tail -1
    e2e 240 --model-dir /tmp/rl --profile h100 --steps 20 --window 8 --name large_h100
    rm -rf /tmp/rl
    timeout 280 python3 benchmarks/gpu_bench.py --out "$OUT/bench" --models medium,large --variants ref,h100 --steps 10 2>&1 | quiet | tail -6
    ;;
  ddp)
    # #9 part 5: samples/s on 2 GPUs vs 1, same global batch of 4 (1 GPU x batch 4 vs 2 GPUs x batch 2; both with CUDA graphs)
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    e2e 200 --model-dir /tmp/rm --profile h100 --steps 24 --window 8 --name medium_1gpu train.batch_size=4
    timeout 240 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
      benchmarks/train_e2e.py --model-dir /tmp/rm --profile h100 --steps 24 --window 8 \
      --out "$OUT" --name medium_2gpu data.source=/tmp/sq train.batch_size=2 2>&1 | quiet \
      | grep -v -E '^\s+("name"|"calls"|"ms_per_step"|\{|\},?)' | tail -40
    # then, time left: the same-run bench (reference vs ours), Medium
    timeout 200 python3 benchmarks/gpu_bench.py --out "$OUT/bench" --models medium --variants ref,h100 --steps 10 2>&1 | quiet | tail -4
    ;;
  ddp8)
    # the H100 profile's own per-GPU batch (4): 1 GPU x batch 8 vs 2 GPUs x batch 4 (global batch 8);
    # then where the T4-profile step spends host time
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    e2e 150 --model-dir /tmp/rm --profile h100 --steps 20 --window 8 --name medium_1gpu_b8 train.batch_size=8
    timeout 170 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
      benchmarks/train_e2e.py --model-dir /tmp/rm --profile h100 --steps 20 --window 8 \
      --out "$OUT" --name medium_2gpu_b4 data.source=/tmp/sq train.batch_size=4 2>&1 | quiet \
      | grep -v -E '^\s+("name"|"calls"|"ms_per_step"|\{|\},?)' | tail -40
    e2e 130 --model-dir /tmp/rm --profile t4 --steps 8 --window 3 --name medium_t4_host --cpu-profile
    ;;
  next)
    python3 benchmarks/random_model.py medium /tmp/rm | tail -1
    e2e 150 --model-dir /tmp/rm --profile h100 --steps 30 --window 10 --name medium_h100_nodrain
    e2e 150 --model-dir /tmp/rm --profile t4 --steps 12 --window 4 --name medium_t4_fp16 \
      train.mixed_precision=fp16 model.dtype=fp16
    timeout 200 python3 benchmarks/compile_cache.py --model medium 2>&1 | quiet | tail -3
    # three aspect buckets: warm-up (a compile per bucket shape), peak memory (CUDA graphs per shape), and
    # validation in the middle of CUDA-graphed training (eager blocks in between graph replays)
    python3 benchmarks/square_dataset.py /tmp/mix 36 --aspects 1,1.5,0.67 >/dev/null
    timeout 240 python3 benchmarks/train_e2e.py --out "$OUT" --model-dir /tmp/rm --profile h100 --steps 30 --window 10 \
      --name medium_h100_3buckets data.source=/tmp/mix train.validation_every=12 2>&1 | quiet | grep -E "done:|s_per_step|gpu_busy|peak|wall_total"
    ;;
esac
