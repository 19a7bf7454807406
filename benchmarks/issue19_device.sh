#!/usr/bin/env bash
# Issue #19's GPU runs, one device call each (<= 9 min). Carry .whl (diffusers, psutil, bitsandbytes), .whl-extra
# (torchvision 0.26.0 for the peer, torchao 0.18.0 for the FP8 rows) and, for `peer`, .peer (the diffusers script).
#   bash benchmarks/issue19_device.sh levers   one H200: the levers, Large then Medium, in one process (~9 min)
#   bash benchmarks/issue19_device.sh peer     one H200: the peer vs `sd35hub train`, Medium + Large, cold/warm (~9 min)
#   bash benchmarks/issue19_device.sh floor    one H200: the kernel floor (kernel_floor.py) and the traces by kernel kind
#                                              at the h200 batches (Medium 8, Large 4) (~4 min)
#   bash benchmarks/issue19_device.sh warm     one H200: goal 5, time to the first step; compiles the installed packages'
#                                              bytecode first (pip's default, what a user's install has), then ours
#                                              cold, warm and warm under cProfile, Medium + Large (~9 min)
#   bash benchmarks/issue19_device.sh both     kind nvidia-h200-x2: levers on GPU 1 while peer runs on GPU 0 (the
#                                              bench's compile threads share the host with the eager peer: caveat)
# Results: $OUT/levers/bench.{json,md}, $OUT/e2e/peer_e2e.{json,md} and $OUT/e2e/logs/*.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl-extra/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 SD35HUB_CACHE=/tmp/sdc OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
quiet() { grep -v -i -E "warn|^W1|Loading|torchao|Enum subclass|_C_"; }
PLAN="large=ref,h100,nocast,fused-nocast,fp8-nocast,graph-nocast;medium=ref,h100,nocast,fused-nocast,h100-flash,cdt-nocast"
levers() {
  timeout 510 python3 benchmarks/gpu_bench.py --out "$OUT/levers" --plan "${PLAN_OVERRIDE:-$PLAN}" --steps 8 --budget-s 4 \
    --deadline-s "${1:-490}" --min-left-s 50 --variant-timeout-s 150 --curve-steps 60 --curve-variants h100,fp8-nocast
}
peer() {
  timeout 515 python3 benchmarks/peer_e2e.py --out "$OUT/e2e" --root /tmp/pe --deadline-s "${1:-500}" ${PEER_ARGS:-}
}
floor() {
  timeout 330 python3 benchmarks/kernel_floor.py --out "$OUT/kf" --batches "${FLOOR_BATCHES:-medium=8,large=4}" --reps 15
  timeout 230 python3 benchmarks/gpu_bench.py --out "$OUT/tr8" --models "" --batch 8 --trace medium:h100
  timeout 150 python3 benchmarks/gpu_bench.py --out "$OUT/tr4" --models "" --batch 4 --trace large:h100
}
bytecode() {  # pip compiles bytecode at install (its default); this machine's venv has none, and the wheels above
  # were installed --no-compile: without it every launch compiles ~1,200 modules from source (run 20: 3.3-3.6 s)
  echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"
  for d in $(python3 -c "import site, sys; print(' '.join(p for p in sys.path if p.endswith('-packages') or p == '/tmp/site'))"); do
    echo "$d: $(find "$d" -name '*.pyc' 2>/dev/null | wc -l) .pyc for $(find "$d" -name '*.py' 2>/dev/null | wc -l) .py"
    TIMEFORMAT="  compiled in %R s"; time (python3 -m compileall -q -j 16 "$d" > /dev/null 2>&1)
  done
  [ -n "${SKIP_IMPORTTIME:-}" ] && return
  python3 -X importtime -c "import diffusers.models.transformers.transformer_sd3, peft, torch._dynamo" 2> "$OUT/importtime.txt"
  sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -2
}
case "${1:-}" in
  warm)
    mkdir -p "$OUT"; bytecode 2>&1 | tee "$OUT/bytecode.txt"
    PEER_ARGS="--runs ${WARM_RUNS:-cold,warm,prof} ${PEER_ARGS:-}" peer 2>&1 | quiet | tail -40
    (cd "$OUT" && tar czf warm.tgz e2e bytecode.txt $(ls importtime.txt 2>/dev/null) && rm -rf e2e importtime.txt)
    ;;
  levers) levers 2>&1 | quiet | tail -80 ;;
  floor) floor 2>&1 | quiet | tail -80 ;;
  peer) peer 2>&1 | quiet | tail -50 ;;
  both)
    mkdir -p "$OUT"
    CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_COMPILE_THREADS=8 levers > "$OUT/levers.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=0 peer 2>&1 | quiet | tail -40
    wait
    quiet < "$OUT/levers.log" | tail -60
    ;;
  *) echo "usage: bash benchmarks/issue19_device.sh levers|peer|floor|warm|both" >&2; exit 2 ;;
esac
