"""GPU benchmark: reference steps and sd35hub's profile steps for SD3.5 Medium/Large, one process.

usage: python benchmarks/gpu_bench.py --out DIR [--models medium,large] [--variants ref,h100,t4,...]
       [--deadline-s 500] [--variant-timeout-s 150] [--budget-s 4] [--curve-steps 100 --curve-variants h100,fp8]
       [--plan "large=ref,h100,nocast;medium=ref,h100"]   (per-model variant lists, in that order)
       python benchmarks/gpu_bench.py --smoke --out DIR     (CPU, tiny model, every lever variant, aot_eager)
Writes DIR/bench.json (all numbers, every step's loss) and DIR/bench.md (one table per model: s/step, MFU,
ratio to the same-run `h100` row and to the reference, the loss trajectory's largest deviation from the
`h100` row's) after every variant, so a run cut short keeps what it measured. ``--deadline-s``: no variant
starts later than that many seconds after the start minus ``--min-left-s``; each variant is stopped after
``--variant-timeout-s`` (recorded as an error row). Variants:
  ref        reference eager (diffusers-script way)
  ref-ckpt   reference + gradient checkpointing
  ref-nf4    reference NF4 base + checkpointing
  h100       ours, H100 profile (regional compile, cuDNN attention, fused AdamW, fp32 LoRA master)
  h100-flash ours, as h100 but flash attention (to isolate the attention backend)
  eager-cudnn ours without compile (isolates compile)
  t4         ours, 16 GB profile (NF4 base, checkpointing, compile)
  t4-ckpt2   ours, NF4 base, checkpointing every 2nd block, compile
  issue #19's levers (ours = the h100 row + one change; exact on the CPU tiny model, tests/test_levers.py):
  nocast     peft does not copy each LoRA input to fp32 (autocast casts it straight back)
  fused      LoRA's down-projection inside the base product ([W; A]), fused backward (train/fused_lora.py)
  fused-nocast, graph (whole step = one CUDA graph, blocks compiled without their own graphs), graph-nocast,
  graph-fused-nocast, h100-eff (efficient SDPA), cdt (inductor coordinate-descent tuning), ma (max-autotune
  GEMM templates + CUDA graphs), cdt-nocast, bf16lora (LoRA weights in bf16: no master casts; not exact on a
  GPU), fp8-nocast, fp8-graph-nocast,
  qkv (each attention's q/k/v and add_q/k/v as one base product + one LoRA down-projection, each layer's own
  LoRA: train/fused_qkv.py), qkv-nocast, graph-qkv-nocast
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
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
_H = B.PROFILE_STEPS["h100"]
_CDT = (("coordinate_descent_tuning", True),)
VARIANTS.update({
    "nocast": replace(_H, name="ours + no LoRA input cast", lora_input_cast=False),
    "fused": replace(_H, name="ours + fused LoRA down-proj", fused_lora=True),
    "fused-nocast": replace(_H, name="ours + fused LoRA + no cast", fused_lora=True, lora_input_cast=False),
    "graph": replace(_H, name="ours, whole step 1 CUDA graph", graph_step=True),
    "graph-nocast": replace(_H, name="ours, 1 graph + no cast", graph_step=True, lora_input_cast=False),
    "graph-fused-nocast": replace(_H, name="ours, 1 graph + fused + no cast", graph_step=True, fused_lora=True,
                                  lora_input_cast=False),
    "h100-eff": replace(_H, name="ours h100, efficient attention", attention="efficient"),
    "cdt": replace(_H, name="ours + coordinate descent tuning", inductor=_CDT),
    "cdt-nocast": replace(_H, name="ours + cdt + no cast", inductor=_CDT, lora_input_cast=False),
    "ma": replace(_H, name="ours compile max-autotune (+graphs)", compile_mode="max-autotune"),
    "bf16lora": replace(_H, name="ours, bf16 LoRA weights", fp32_lora=False),
    "qkv": replace(_H, name="ours + fused q/k/v products", fused_qkv=True),
    "qkv-nocast": replace(_H, name="ours + fused q/k/v + no cast", fused_qkv=True, lora_input_cast=False),
    "graph-qkv-nocast": replace(_H, name="ours, 1 graph + fused q/k/v + no cast", graph_step=True, fused_qkv=True,
                                lora_input_cast=False),
    "fp8-nocast": replace(_H, name="ours FP8 base + no cast", float8=True, lora_input_cast=False),
    "fp8-graph-nocast": replace(_H, name="ours FP8 + 1 graph + no cast", float8=True, graph_step=True,
                                lora_input_cast=False),
})
SMOKE_VARIANTS = "ref,h100,nocast,fused,fused-nocast,graph,graph-fused-nocast,h100-eff,cdt,bf16lora,qkv-nocast,graph-qkv-nocast"


class VariantTimeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ANN202, ARG001
    raise VariantTimeout("variant time limit reached")


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
    ap.add_argument("--budget-s", type=float, default=None, help="stop a variant's timed steps after this long")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no variant after this (minus --min-left-s)")
    ap.add_argument("--min-left-s", type=float, default=45.0)
    ap.add_argument("--variant-timeout-s", type=float, default=1e9)
    ap.add_argument("--curve-steps", type=int, default=0, help="loss curve on fresh seeded inputs after timing")
    ap.add_argument("--curve-variants", default="h100,fp8-nocast,h100-fp8")
    ap.add_argument("--trace", default="", help="model:variant[,model:variant] to profile (kernel time vs wall time)")
    ap.add_argument("--smoke", action="store_true", help="CPU check of every lever path: tiny model, aot_eager")
    ap.add_argument("--plan", default="", help="MODEL=V1,V2;MODEL=... : per-model variant lists (overrides --models/--variants)")
    args = ap.parse_args()
    plan = dict(part.split("=", 1) for part in args.plan.split(";") if part) if args.plan else {}
    unknown = sorted(({k for v in plan.values() for k in v.split(",")} | set(args.variants.split(","))) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if args.smoke:
        from sd35hub.train import speed

        speed.COMPILE_BACKEND = "aot_eager"  # dynamo + AOT autograd as on the GPU, without inductor's C++ compile
        args.models, args.resolution, args.steps, args.warmup = "tiny", 64, 2, 2
        if args.variants == ap.get_default("variants"):
            args.variants = SMOKE_VARIANTS
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(info), flush=True)
    everything = {"info": info, "results": [], "errors": [], "skipped": []}
    start = time.perf_counter()
    curve_keys = set(args.curve_variants.split(","))
    for model in plan or filter(None, args.models.split(",")):
        results = []
        flops = None
        for key in filter(None, plan.get(model, args.variants).split(",")):
            variant = VARIANTS[key]
            left = args.deadline_s - (time.perf_counter() - start)
            if left < args.min_left_s:
                everything["skipped"].append({"model": model, "variant": key, "why": f"{left:.0f} s left"})
                print(f"[{model}] {key}: skipped, {left:.0f} s left of the deadline", flush=True)
                continue
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, max(min(args.variant_timeout_s, left - 5), 1))
            try:
                r = B.run_variant(model, variant, resolution=args.resolution, batch=args.batch, rank=args.rank,
                                  steps=args.steps, warmup=args.warmup, device=device, flops=flops,
                                  budget_s=args.budget_s, curve_steps=args.curve_steps if key in curve_keys else 0)
                signal.setitimer(signal.ITIMER_REAL, 0)
                flops = r.extra["flops"]
                r.extra["key"] = key
                results.append(r)
                everything["results"].append(asdict(r))
                print(f"[{model}] {variant.name}: {r.s_per_step:.4f} s/step, {r.peak_gib:.2f} GiB, warmup {r.warmup_s:.1f} s, "
                      f"loss {r.loss_start:.4f}->{r.loss_end:.4f}", flush=True)
            except Exception as exc:  # keep going: one failing variant must not lose the others
                signal.setitimer(signal.ITIMER_REAL, 0)
                traceback.print_exc(limit=6)
                everything["errors"].append({"model": model, "variant": key, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            finally:
                _clean(device)
            (args.out / "bench.json").write_text(json.dumps(everything, indent=2))
            (args.out / "bench.md").write_text(markdown(everything))
        print(B.format_table(results), flush=True)
    (args.out / "bench.json").write_text(json.dumps(everything, indent=2))
    (args.out / "bench.md").write_text(markdown(everything))
    for spec in filter(None, args.trace.split(",")):
        model, key = spec.split(":")
        print(trace(model, VARIANTS[key], args), flush=True)
        _clean(device)
    print(markdown(everything), flush=True)


def _clean(device: str) -> None:
    import gc

    from sd35hub.train import speed

    gc.collect()
    speed.reset_compiler()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _deviation(losses: list[float], base: list[float]) -> float | None:
    """Largest relative difference of two loss trajectories over their common steps."""
    pairs = list(zip(losses, base, strict=False))
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs) if pairs else None


def markdown(everything: dict) -> str:
    """One table per model: each row against the same-run `h100` row (base) and the reference (`ref`)."""
    info = everything["info"]
    lines = [f"# gpu_bench: {info['device']}, torch {info['torch']}", ""]
    models = dict.fromkeys(r["model"] for r in everything["results"])
    for model in models:
        rows = [r for r in everything["results"] if r["model"] == model]
        by_key = {r["extra"].get("key"): r for r in rows}
        base, ref = by_key.get("h100"), by_key.get("ref")
        lines += [f"## {model}, {rows[0]['resolution']} px, batch {rows[0]['batch']}, rank {rows[0]['rank']}", "",
                  "| key | variant | s/step | samples/s | TFLOP/s | MFU | vs h100 | vs ref | loss dev vs h100 | warm-up s | peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
            vs_base = f"{base['s_per_step'] / r['s_per_step']:.3f}x" if base else "-"
            vs_ref = f"{ref['s_per_step'] / r['s_per_step']:.2f}x" if ref else "-"
            dev = _deviation(r["extra"]["losses"], base["extra"]["losses"]) if base and r is not base else None
            lines.append(f"| {r['extra'].get('key')} | {r['variant']} | {r['s_per_step']:.4f} | {r['samples_per_s']:.2f} | {tf} "
                         f"| {mfu} | {vs_base} | {vs_ref} | {'-' if dev is None else f'{dev:.1e}'} | {r['warmup_s']:.1f} "
                         f"| {r['peak_gib']:.2f} |")
        curves = {k: r["extra"]["curve"] for k, r in by_key.items() if r["extra"].get("curve")}
        if curves:
            lines += ["", "loss curve on fresh seeded inputs (the same for every row): mean, and vs the h100 row",
                      "| key | steps | mean loss | std of the curve | mean abs diff vs h100 | mean diff vs h100 |", "|---|---|---|---|---|---|"]
            bc = curves.get("h100")
            for k, c in curves.items():
                n = len(c)
                mean = sum(c) / n
                std = (sum((v - mean) ** 2 for v in c) / n) ** 0.5
                if bc and k != "h100":
                    d = [a - b for a, b in zip(c, bc, strict=False)]
                    mad, md = f"{sum(abs(v) for v in d) / len(d):.4f}", f"{sum(d) / len(d):+.4f}"
                else:
                    mad = md = "-"
                lines.append(f"| {k} | {n} | {mean:.4f} | {std:.4f} | {mad} | {md} |")
        lines.append("")
    for e in everything["errors"]:
        lines.append(f"- ERROR {e['model']} {e['variant']}: {e['error'][:300]}")
    for e in everything["skipped"]:
        lines.append(f"- skipped {e['model']} {e['variant']}: {e['why']}")
    return "\n".join(lines) + "\n"


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
    kinds: dict[str, list[float]] = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds.setdefault(kind, [0.0, 0])
        kinds[kind][0] += e.self_device_time_total / 3 / 1e3
        kinds[kind][1] += e.count // 3
    lines.append("  by kind: " + ", ".join(f"{k} {ms:.1f} ms ({n} kernels)" for k, (ms, n) in
                                          sorted(kinds.items(), key=lambda kv: -kv[1][0])))
    return "\n".join(lines)


def kernel_kind(name: str) -> str:
    """A kernel's kind for the trace's totals: attention, GEMM (cuBLAS/nvjet/CUTLASS), Triton (inductor's fused
    pointwise/reduction kernels), copies, or other."""
    low = name.lower()
    if any(t in low for t in ("sdpa", "flash", "fmha", "attention", "dot_do_o")):
        return "attention"
    if any(t in low for t in ("nvjet", "gemm", "cutlass", "xmma", "cublas", "_mm_", "splitk")):
        return "gemm"
    if low.startswith("triton_"):
        return "triton"
    if "memcpy" in low or "memset" in low or "copy" in low or "fill" in low:
        return "copy/fill"
    return "other"


if __name__ == "__main__":
    main()
