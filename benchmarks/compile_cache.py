"""Compile warm-up in a fresh process, without and then with inductor's on-disk cache.

`sd35hub.train.speed.compile_blocks` keeps inductor's cache in `$SD35HUB_CACHE/inductor` (default
~/.cache/sd35hub/inductor) instead of /tmp, so a later run (or a new Colab VM with SD35HUB_CACHE on
Drive) reuses the compiled blocks. This runs the same compiled training step (the bench's "ours" step)
in two fresh processes sharing one empty cache folder and prints both warm-ups.

usage: python benchmarks/compile_cache.py [--model tiny|medium|large] [--resolution PX]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(model: str, resolution: int) -> None:
    import torch

    from sd35hub.bench import PROFILE_STEPS, run_variant

    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = run_variant(model, PROFILE_STEPS["h100"], resolution=resolution, batch=1, rank=16, steps=3, warmup=1,
                    device=device)
    print(json.dumps({"warmup_s": round(r.warmup_s, 2), "s_per_step": round(r.s_per_step, 4), "device": device}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    resolution = args.resolution or (128 if args.model == "tiny" else 1024)
    if args.child:
        child(args.model, resolution)
        return
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SD35HUB_CACHE": cache}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        for label in ("fresh cache", "second run, same cache"):
            run = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--resolution", str(resolution)],
                                 env=env, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{label}: the child process failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{label:24s} warm-up {result['warmup_s']:7.2f} s   step {result['s_per_step']:.4f} s   ({result['device']})")
        print(f"inductor cache: {sum(1 for _ in Path(cache, 'inductor').rglob('*'))} files under $SD35HUB_CACHE/inductor")


if __name__ == "__main__":
    main()
