"""The kernel floor of one LoRA training step (issue #19): every matrix product and attention call the step
runs, timed alone at its real shape with the fastest kernel this card offers, and summed.

The step's work is inventoried on the real model (sd35hub.bench: the full-size random SD3.5 transformer with
the trainer's LoRA, bf16 autocast) by one forward under a TorchFunctionMode that records each ``F.linear`` and
``F.scaled_dot_product_attention`` call: shapes, and which operands need gradients. The backward work follows
from that: a frozen base layer costs its forward product and, where its input needs a gradient, the input
gradient (dx = g W); a LoRA product also its weight gradient; attention its backward. Each distinct shape is
then timed alone (``--reps`` calls back to back, as one CUDA graph for the products; best of 3), attention with each SDPA backend (cuDNN, flash,
efficient) and the best kept, the base products also as FP8 (``torch._scaled_mm``, e4m3, row-wise scales,
without the casts). The sums are the floor a step could reach if everything else (norms, modulation, GELU,
casts, the optimizer, launches) took no time and each kernel ran as fast as it does alone.

The inventory is checked against PyTorch's FLOP counter on the same step (``--check``; the CPU test does this
on the tiny model), so no product is left out.

usage: python benchmarks/kernel_floor.py --out DIR [--models medium,large] [--batches 1] [--reps 20]
       python benchmarks/kernel_floor.py --smoke --out DIR      (CPU, tiny model: inventory + FLOP check only)
Writes DIR/kernel_floor.json and DIR/kernel_floor.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd35hub import bench as B  # noqa: E402


@dataclass(frozen=True)
class Linear:
    m: int  # rows of the input (tokens x batch)
    k: int  # in features
    n: int  # out features
    lora: bool  # a trainable (LoRA) weight: its weight gradient is computed
    dx: bool  # the input needs a gradient

    def flops(self) -> tuple[float, float]:
        fwd = 2.0 * self.m * self.k * self.n
        return fwd, fwd * (int(self.dx) + int(self.lora))


@dataclass(frozen=True)
class Attention:
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    grad: bool

    def flops(self) -> tuple[float, float]:
        fwd = 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim
        return fwd, 2.5 * fwd if self.grad else 0.0  # backward: 5 products of the forward's 2 (FlopCounter's rule)


def inventory(model: str, batch: int, resolution: int, device: str) -> tuple[Counter, dict[str, Any]]:
    """One forward of the trainer's LoRA step on ``model``: a Counter of Linear/Attention calls."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from sd35hub.config import LoraSpec
    from sd35hub.train.lora import attach_lora

    variant = B.PROFILE_STEPS["h100"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    transformer = B.build_transformer(model, variant, device, dtype)
    attach_lora(transformer, LoraSpec(rank=16, alpha=16, targets="attention", init="gaussian"), fp32_params=True)
    cfg = B.transformer_config(model)
    inputs = B.make_inputs(cfg, resolution, batch, device, dtype)
    calls: Counter = Counter()

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if func is F.linear:
                x, w = args[0], args[1]
                calls[Linear(x.numel() // x.shape[-1], w.shape[1], w.shape[0], bool(w.requires_grad),
                             bool(x.requires_grad))] += 1
            elif func is F.scaled_dot_product_attention:
                q, k = args[0], args[1]
                calls[Attention(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                bool(q.requires_grad or k.requires_grad))] += 1
            return func(*args, **kwargs)

    with Record(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = B._loss(transformer, inputs)
    del loss
    meta = {"counted": count_by_op(transformer, inputs)}
    del transformer, inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return calls, meta


def count_by_op(transformer: Any, inputs: dict[str, Any]) -> dict[str, float]:
    """PyTorch's FLOP counter on one forward + backward of the same step, per aten op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(inputs["latents"].device.type, dtype=torch.bfloat16, enabled=inputs["latents"].is_cuda):
        B._loss(transformer, inputs).backward()
    for p in transformer.parameters():
        p.grad = None
    return {str(op): float(v) for op, v in counter.get_flop_counts()["Global"].items()}


def inventory_flops(calls: Counter, kind: type | None = None) -> float:
    return sum(n * sum(op.flops()) for op, n in calls.items() if kind is None or isinstance(op, kind))


def check(calls: Counter, counted: dict[str, float]) -> dict[str, float]:
    """The inventory against the FLOP counter: products (mm, addmm, bmm) and attention (the SDPA kernels; on the
    CPU the counter does not see the attention kernel, so only products are compared there)."""
    products = sum(v for op, v in counted.items() if op in ("aten.mm", "aten.addmm", "aten.bmm"))
    attention = sum(v for op, v in counted.items() if "attention" in op)
    return {"inventory_products": inventory_flops(calls, Linear), "counted_products": products,
            "inventory_attention": inventory_flops(calls, Attention), "counted_attention": attention,
            "counted_other": sum(counted.values()) - products - attention}


def _time(fn, reps: int, graph: bool = False) -> float:  # noqa: ANN001
    """Seconds per call of ``fn`` on the GPU: ``reps`` calls back to back between two CUDA events, as in a
    step (no launch gap before each kernel); ``graph``: the calls captured as one CUDA graph first, so that
    products of a few microseconds are not timed as Python's launch rate."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = lambda: [fn() for _ in range(reps)]  # noqa: E731
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run()
        run = captured.replay
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000.0 / reps)
    return best


def time_linear(op: Linear, reps: int) -> dict[str, float]:
    import torch

    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(op.m, op.k, device=dev, dtype=bf16)
    w = torch.randn(op.n, op.k, device=dev, dtype=bf16)
    g = torch.randn(op.m, op.n, device=dev, dtype=bf16)
    out = {"fwd": _time(lambda: torch.mm(x, w.t()), reps, graph=True)}
    out["dx"] = _time(lambda: torch.mm(g, w), reps, graph=True) if op.dx else 0.0
    out["dw"] = _time(lambda: torch.mm(g.t(), x), reps, graph=True) if op.lora else 0.0
    if not op.lora and op.m % 16 == 0 and op.k % 16 == 0 and op.n % 16 == 0:  # FP8 needs multiples of 16
        f8 = torch.float8_e4m3fn
        x8, w8, g8 = x.to(f8), w.to(f8), g.to(f8)
        wt8 = w.t().contiguous().to(f8)  # dx = g W: W as the column-major second operand
        sx = torch.ones(op.m, 1, device=dev)
        sw = torch.ones(1, op.n, device=dev)
        sk = torch.ones(1, op.k, device=dev)
        out["fwd_fp8"] = _time(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=bf16), reps,
                               graph=True)
        out["dx_fp8"] = (_time(lambda: torch._scaled_mm(g8, wt8.t(), scale_a=sx, scale_b=sk, out_dtype=bf16), reps, graph=True)
                         if op.dx else 0.0)
    return out


def time_attention(op: Attention, reps: int) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (op.batch, op.heads, op.q_len, op.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    result = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
                out = F.scaled_dot_product_attention(q, k, v)

                def both() -> None:
                    o = F.scaled_dot_product_attention(q, k, v)
                    torch.autograd.grad(o, (q, k, v), g)

                total = _time(both, reps) if op.grad else fwd
            result[name] = {"fwd": fwd, "bwd": total - fwd}
            del out
        except RuntimeError as err:  # a backend that does not take this shape on this card
            result[name] = {"error": str(err).splitlines()[0][:160]}
    return result


def floor(model: str, batch: int, resolution: int, reps: int) -> dict[str, Any]:
    import torch

    calls, meta = inventory(model, batch, resolution, "cuda")
    rows, att_rows = [], []
    sums = Counter()
    for op, n in sorted(calls.items(), key=lambda kv: -kv[1] * sum(kv[0].flops())):
        fwd_f, bwd_f = op.flops()
        if isinstance(op, Linear):
            t = time_linear(op, reps)
            kind = "lora" if op.lora else "base"
            sums[f"{kind}_s"] += n * (t["fwd"] + t["dx"] + t["dw"])
            sums[f"{kind}_flops"] += n * (fwd_f + bwd_f)
            if kind == "base":
                fp8 = t.get("fwd_fp8", t["fwd"]) + t.get("dx_fp8", t["dx"])
                sums["base_fp8_s"] += n * fp8
            rows.append({"op": op.__dict__, "calls": n, **t})
        else:
            t = time_attention(op, reps)
            ok = {k: v for k, v in t.items() if "error" not in v}
            best = min(ok, key=lambda k: ok[k]["fwd"] + ok[k]["bwd"])
            for name, v in ok.items():
                sums[f"attention_{name}_s"] += n * (v["fwd"] + v["bwd"])
            sums["attention_s"] += n * (ok[best]["fwd"] + ok[best]["bwd"])
            sums["attention_flops"] += n * (fwd_f + bwd_f)
            att_rows.append({"op": op.__dict__, "calls": n, "best": best, **t})
        torch.cuda.empty_cache()
    total_flops = inventory_flops(calls)
    bf16 = sums["attention_s"] + sums["base_s"] + sums["lora_s"]
    fp8 = sums["attention_s"] + sums["base_fp8_s"] + sums["lora_s"]
    return {
        "model": model, "batch": batch, "resolution": resolution, "flops": total_flops,
        "check": check(calls, meta["counted"]), "sums": dict(sums),
        "floor_bf16_s": bf16, "floor_fp8_s": fp8, "floor_bf16_per_sample_s": bf16 / batch,
        "floor_fp8_per_sample_s": fp8 / batch, "linears": rows, "attention": att_rows,
    }


def report(results: list[dict[str, Any]], device: str) -> str:
    lines = [f"# kernel floor: {device}, torch {__import__('torch').__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", "Each product / attention call of the step timed alone at its shape (reps back to back; best of 3), summed; "
             "everything else taken as free.", "",
             "| model | batch | TFLOP/step | attention ms (best; cuDNN / flash / efficient) | attention TFLOP/s | "
             "base GEMMs ms (TFLOP/s) | LoRA products ms | floor bf16 s/sample | base GEMMs as FP8 ms | floor FP8 s/sample |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["sums"]
        att = " / ".join(f"{1e3 * s[k]:.1f}" if k in s else "-" for k in
                         ("attention_cudnn_s", "attention_flash_s", "attention_efficient_s"))
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['flops'] / 1e12:.1f} | {1e3 * s['attention_s']:.1f} ({att}) "
            f"| {s['attention_flops'] / s['attention_s'] / 1e12:.0f} | {1e3 * s['base_s']:.1f} "
            f"({s['base_flops'] / s['base_s'] / 1e12:.0f}) | {1e3 * s['lora_s']:.1f} | {r['floor_bf16_per_sample_s']:.4f} "
            f"| {1e3 * s['base_fp8_s']:.1f} | {r['floor_fp8_per_sample_s']:.4f} |")
    lines.append("")
    for r in results:
        c = r["check"]
        lines.append(f"- {r['model']} batch {r['batch']}: inventory vs PyTorch's FLOP counter: products "
                     f"{c['inventory_products'] / 1e12:.3f} / {c['counted_products'] / 1e12:.3f} TFLOP, attention "
                     f"{c['inventory_attention'] / 1e12:.3f} / {c['counted_attention'] / 1e12:.3f}, not inventoried "
                     f"(convolution) {c['counted_other'] / 1e12:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--batches", default="1", help="comma list; per model, or MODEL=B (e.g. medium=8,large=4)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: inventory and FLOP check only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        calls, meta = inventory("tiny", 2, 128, "cpu")
        result = check(calls, meta["counted"])
        print(json.dumps(result))
        (args.out / "kernel_floor.json").write_text(json.dumps(result))
        return
    import torch

    results = []
    for model in args.models.split(","):
        for item in args.batches.split(","):
            if "=" in item:
                name, value = item.split("=")
                if name != model:
                    continue
                item = value
            t = time.perf_counter()
            results.append(floor(model, int(item), args.resolution, args.reps))
            results[-1]["seconds"] = round(time.perf_counter() - t, 1)
            (args.out / "kernel_floor.json").write_text(json.dumps(results, indent=1))
            md = report(results, torch.cuda.get_device_name(0))
            (args.out / "kernel_floor.md").write_text(md)
            print(md, flush=True)


if __name__ == "__main__":
    main()
