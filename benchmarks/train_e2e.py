"""End-to-end `sd35hub train` on a full-size random SD3.5 architecture, with the GPU-busy fraction.

Runs the real recipe (access checks off, sample dataset -> buckets -> latent/embedding cache ->
LoRA training) on a folder from benchmarks/random_model.py, and profiles a window of optimizer
steps: GPU busy = summed kernel time / wall time of those steps (input stalls show up as idle).

usage: python benchmarks/train_e2e.py --model-dir DIR --profile h100 --steps 30 --out OUT [overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--window", type=int, default=8, help="profiled optimizer steps (after warm-up)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="run")
    ap.add_argument("--cpu-profile", action="store_true", help="also record the top host-side ops of the window")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sd35hub.config import load_config
    from sd35hub.run_summary import RunSummary
    from sd35hub.train.recipe import train

    out_dir = args.out / args.name
    overrides = [
        f"model.name={args.model_dir}", "data.source=sample", "data.min_size=64", "data.holdout=2",
        f"train.max_steps={args.steps}", f"train.profile={args.profile}", f"train.output_dir={out_dir}",
        "train.checkpoint_every=0", "train.validation_every=0", "train.validation_steps=2", "hub.check_access=false",
        "train.log_every=5", *args.overrides,
    ]
    cfg = load_config(None, overrides)
    start = max(args.steps - args.window - 2, 3)
    window = {"prof": None, "t0": 0.0, "steps": 0}
    step_ends: list[float] = []  # host time at each optimizer step's end (recompiles and graph recordings show here)

    def on_step(trainer) -> None:  # noqa: ANN001
        step = trainer.state.step
        step_ends.append(time.perf_counter())
        if not torch.cuda.is_available():
            return
        if step == start:
            window["samples0"] = trainer.state.samples_seen
            torch.cuda.synchronize()
            activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.cpu_profile else [])
            window["prof"] = profile(activities=activities)
            window["prof"].__enter__()
            window["t0"] = time.perf_counter()
        elif window["prof"] is not None and step == start + args.window:
            torch.cuda.synchronize()
            window["wall"] = time.perf_counter() - window["t0"]
            window["samples"] = trainer.state.samples_seen - window["samples0"]
            window["prof"].__exit__(None, None, None)
            events = window["prof"].key_averages()
            window["kernel_s"] = sum(e.self_device_time_total for e in events) / 1e6
            window["kernel_span_s"] = kernel_span_s(window["prof"])
            window["top_kernels"] = top_events(events, "self_device_time_total", args.window, 25)
            if args.cpu_profile:
                window["top_host_ops"] = top_events(events, "self_cpu_time_total", args.window, 30)
            window["prof"] = None

    explicit = {o.split("=")[0] for o in args.overrides}
    t0 = time.perf_counter()
    result = train(cfg, explicit=explicit, on_step=on_step, progress=False)
    total = time.perf_counter() - t0
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    summary = RunSummary.read(out_dir).to_dict() if rank == 0 else {}
    report = {
        "rank": rank, "processes": world,
        "name": args.name, "profile": args.profile, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "variant": summary.get("variant"), "steps": summary.get("steps"), "batch_size": summary.get("batch_size"),
        "resolution_buckets": summary.get("resolution_buckets"), "peak_memory_gib": summary.get("peak_memory_gib"),
        "final_loss": summary.get("final_loss"), "initial_validation_loss": summary.get("initial_validation_loss"),
        "validation_loss": summary.get("validation_loss"), "wall_total_s": round(total, 1),
        "window_steps": args.window, "window_wall_s": window.get("wall"), "window_kernel_s": window.get("kernel_s"),
        "s_per_step": (window["wall"] / args.window) if "wall" in window else None,
        "gpu_busy": (window["kernel_s"] / window["wall"]) if "wall" in window else None,
        # the same over first kernel start -> last kernel end: leaves out the drain that the window's own
        # opening synchronize causes (the host prepares the first step while the GPU waits)
        "gpu_busy_kernel_span": (window["kernel_s"] / window["kernel_span_s"]) if window.get("kernel_span_s") else None,
        "window_samples_per_s": (window["samples"] / window["wall"]) if "wall" in window else None,
        "to_first_step_s": round(step_ends[0] - t0, 1) if step_ends else None,
        "adapter": str(result.adapter_path),
        "top_kernels": window.get("top_kernels"),
        "top_host_ops": window.get("top_host_ops"),
    }
    if report["s_per_step"] and summary.get("batch_size"):
        accumulation = summary.get("gradient_accumulation") or 1
        report["global_samples_per_s"] = summary["batch_size"] * accumulation * world / report["s_per_step"]
    print(json.dumps(report, indent=2), flush=True)
    report["step_wall_s"] = [round(b - a, 3) for a, b in pairwise(step_ends)]
    suffix = f".rank{rank}" if world > 1 else ""
    (args.out / f"{args.name}{suffix}.json").write_text(json.dumps(report, indent=2))


def top_events(events, time_attr: str, steps: int, count: int) -> list[dict]:  # noqa: ANN001
    """The ``count`` profiler events with the most ``time_attr`` (µs), as ms per optimizer step."""
    top = sorted(events, key=lambda e: getattr(e, time_attr), reverse=True)[:count]
    return [{"name": e.key[:120], "calls": e.count, "ms_per_step": round(getattr(e, time_attr) / 1e3 / steps, 3)} for e in top]


def kernel_span_s(prof) -> float | None:  # noqa: ANN001
    """Seconds from the first GPU kernel's start to the last one's end in a finished profile."""
    from torch.autograd import DeviceType

    try:
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception:  # noqa: BLE001 - a profiler API difference must not lose the run's other numbers
        return None
    return (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e6 if spans else None


if __name__ == "__main__":
    main()
