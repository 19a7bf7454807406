"""GPU check of `sd35hub train` with train.fused_qkv on the tiny model (the h100 profile): the
logged losses of a fused and an unfused run of 8 steps. usage: python benchmarks/square_dataset.py /tmp/sq 34 && python benchmarks/qkv_train_check.py"""

import json
import shutil
import sys
import time
from pathlib import Path

from sd35hub.config import load_config
from sd35hub.train.recipe import train

PROFILE = sys.argv[1] if len(sys.argv) > 1 else "h100"
out = {}
for fused in (False, True):
    d = Path(f"/tmp/q{int(fused)}")
    shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(None, ["model.name=tiny", "data.source=/tmp/sq", "data.min_size=64", "data.resolution=128",
                             f"train.profile={PROFILE}", "train.batch_size=2", "train.max_steps=8", f"train.fused_qkv={str(fused).lower()}",
                             f"train.output_dir={d}", "hub.check_access=false", "train.validation_every=4", "train.checkpoint_every=0",
                             "train.log_every=1", "train.seed=0"])
    t = time.time()
    train(cfg, progress=False)
    lines = [json.loads(line) for line in (d / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out[fused] = [round(rec["loss"], 6) for rec in lines if "loss" in rec]
    print("fused" if fused else "plain", round(time.time() - t, 1), "s", out[fused], flush=True)
print("max |diff|", max(abs(a - b) for a, b in zip(out[False], out[True], strict=True)))
