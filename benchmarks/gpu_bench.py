"""GPU benchmark: reference steps and sd35hub's profile steps for SD3.5 Medium/Large, one process.

usage: python benchmarks/gpu_bench.py --out DIR [--models medium,large] [--variants ref,h100,t4,...]
Writes DIR/bench.json (all numbers) and prints a table per model. Variants:
  ref        reference eager (diffusers-script way)
  ref-ckpt   reference + gradient checkpointing
  ref-nf4    reference NF4 base + checkpointing
  h100       ours, H100 profile (regional compile, cuDNN attention, fused AdamW, fp32 LoRA master)
  h100-flash ours, as h100 but flash attention (to isolate the attention backend)
  eager-cudnn ours without compile (isolates compile)
  t4         ours, 16 GB profile (NF4 base, checkpointing, compile)
  t4-ckpt2   ours, NF4 base, checkpointing every 2nd block, compile
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd35hub import bench as B  # noqa: E402

VARIANTS = {
    "ref": B.REFERENCE_STEPS["eager"],
    "ref-ckpt": B.REFERENCE_STEPS["checkpointing"],
    "ref-nf4": B.REFERENCE_STEPS["nf4"],
    "h100": B.PROFILE_STEPS["h100"],
    "h100-flash": replace(B.PROFILE_STEPS["h100"], name="ours h100, flash attention", attention="flash"),
    "eager-cudnn": replace(B.PROFILE_STEPS["h100"], name="ours eager + cudnn", compile=False),
    "h100-cg": replace(B.PROFILE_STEPS["h100"], name="ours compile reduce-overhead", compile_mode="reduce-overhead"),
    "h100-mat": replace(B.PROFILE_STEPS["h100"], name="ours compile max-autotune", compile_mode="max-autotune-no-cudagraphs"),
    "h100-nocg": replace(B.PROFILE_STEPS["h100"], name="ours compile, no CUDA graphs", compile_mode=None),
    "h100-fp8": replace(B.PROFILE_STEPS["h100"], name="ours h100 + FP8 base", float8=True),
    "t4-cg": replace(B.PROFILE_STEPS["t4"], name="ours nf4 + ckpt + CUDA graphs", compile_mode="reduce-overhead"),
    "t4": B.PROFILE_STEPS["t4"],
    "t4-ckpt2": replace(B.PROFILE_STEPS["t4"], name="ours nf4 + ckpt/2 + compile", checkpoint_every=2),
    "t4-eager": replace(B.PROFILE_STEPS["t4"], name="ours nf4 + ckpt, no compile", compile=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--variants", default="ref,h100,t4")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trace", default="", help="model:variant[,model:variant] to profile (kernel time vs wall time)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    everything = {"info": info, "results": [], "errors": []}
    for model in filter(None, args.models.split(",")):
        results = []
        flops = None
        for key in args.variants.split(","):
            variant = VARIANTS[key]
            try:
                r = B.run_variant(model, variant, resolution=args.resolution, batch=args.batch, rank=args.rank,
                                  steps=args.steps, warmup=args.warmup, device=device, flops=flops)
                flops = r.extra["flops"]
                results.append(r)
                everything["results"].append(asdict(r))
                print(f"[{model}] {variant.name}: {r.s_per_step:.4f} s/step, {r.peak_gib:.2f} GiB, warmup {r.warmup_s:.1f} s, "
                      f"loss {r.loss_start:.4f}->{r.loss_end:.4f}", flush=True)
            except Exception as exc:  # keep going: one failing variant must not lose the others
                traceback.print_exc()
                everything["errors"].append({"model": model, "variant": key, "error": f"{type(exc).__name__}: {exc}"})
                if device == "cuda":
                    torch.cuda.empty_cache()
            (args.out / "bench.json").write_text(json.dumps(everything, indent=2))
        print(B.format_table(results), flush=True)
    for spec in filter(None, args.trace.split(",")):
        model, key = spec.split(":")
        print(trace(model, VARIANTS[key], args), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def trace(model: str, variant: B.StepVariant, args: argparse.Namespace) -> str:
    """Sum of GPU kernel time per step vs wall time per step: tells launch-bound from compute-bound."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sd35hub.train import speed

    speed.reset_compiler()  # a previous trace's graphs must not count against the recompile limit
    transformer = B.build_transformer(model, variant, "cuda", torch.bfloat16)
    inputs = B.make_inputs(B.transformer_config(model), args.resolution, args.batch, "cuda", torch.bfloat16)
    _, step = B.prepare(transformer, variant, args.rank)
    for _ in range(3):
        step(inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(3):
            step(inputs)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 3
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events) / 3
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    lines = [f"trace {model} {variant.name}: wall {wall*1e3:.1f} ms/step, GPU kernels {kernel_us/1e3:.1f} ms/step "
             f"({100*kernel_us/1e3/(wall*1e3):.0f}% busy)"]
    for e in top:
        lines.append(f"  {e.self_device_time_total/3/1e3:8.2f} ms  {e.count//3:5d}x  {e.key[:110]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
