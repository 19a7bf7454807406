"""Cost of applying DoRA / LoKr / LoHa adapters as exact weight deltas (sd35hub.models.weight_deltas) on
SD3.5-Large-shaped Linears, per denoising step, against the same Linears without an adapter and with a
rank-16 LoRA added the way peft does (x A^T B^T).

    python benchmarks/variant_deltas.py [--layers 304] [--tokens 4096] [--batch 2]

304 Linears of 2432 x 2432 = Large's 38 joint blocks x the 8 attention projections (lora.targets
attention); 4096 tokens = a 1024 px image (every projection gets them here: the text stream's 333 tokens
make the real cost of the add_* projections smaller); batch 2 = classifier-free guidance. Random bf16
weights and factors (the cost does not depend on the values). Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sd35hub.models import weight_deltas
from sd35hub.train.variants import VariantAdapter


def factors(kind: str, width: int, rank: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return (0.01 * torch.randn(*shape, generator=g)).to(device)

    if kind == "lokr":  # peft's factorization(2432, -1) = (38, 64): w1 [38, 38] full, w2 rank r of [64, 64]
        return {"lokr_w1": r(38, 38), "lokr_w2_a": r(64, rank), "lokr_w2_b": r(rank, 64)}
    if kind == "loha":
        return {"hada_w1_a": r(width, rank), "hada_w1_b": r(rank, width), "hada_w2_a": r(width, rank),
                "hada_w2_b": r(rank, width)}
    return {"lora_A": r(rank, width), "lora_B": r(width, rank), "lora_magnitude_vector": 1 + r(width)}


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=304)
    parser.add_argument("--width", type=int, default=2432)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        linears = torch.nn.ModuleList(torch.nn.Linear(args.width, args.width) for _ in range(args.layers)).to(torch.bfloat16)
    x = torch.randn(args.batch, args.tokens, args.width, device=device, dtype=torch.bfloat16)
    lora = [(0.01 * torch.randn(args.rank, args.width, device=device, dtype=torch.bfloat16),
             0.01 * torch.randn(args.width, args.rank, device=device, dtype=torch.bfloat16)) for _ in range(args.layers)]

    @torch.inference_mode()
    def step(with_lora: bool = False) -> None:
        for i, linear in enumerate(linears):
            y = linear(x)
            if with_lora:
                a, b = lora[i]
                y = y + (x @ a.T) @ b.T

    rows = [{"variant": "none", "ms_per_step": timed(step, args.repeats)},
            {"variant": "lora (peft-style x A^T B^T)", "ms_per_step": timed(lambda: step(True), args.repeats)}]
    names = [f"transformer_blocks.{i}.attn.to_q" for i in range(args.layers)]
    for kind in ("lokr", "loha", "dora"):
        for i, linear in enumerate(linears):
            variant = VariantAdapter(kind=kind, factors={names[i]: factors(kind, args.width, args.rank, device)},
                                     scales={names[i]: 1.0})
            torch.nn.utils.parametrize.register_parametrization(
                linear, "weight", weight_deltas.WeightDeltas(names[i]), unsafe=True)
            deltas = linear.parametrizations.weight[0]
            deltas.adapters["a"] = variant
            deltas.weights["a"] = 0.8
        torch.cuda.reset_peak_memory_stats()
        ms = timed(step, args.repeats)
        rows.append({"variant": kind, "ms_per_step": ms,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        for linear in linears:
            torch.nn.utils.parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    base = rows[0]["ms_per_step"]
    for row in rows:
        row["overhead_ms"] = row["ms_per_step"] - base
        row.update(layers=args.layers, width=args.width, tokens=args.tokens, batch=args.batch, rank=args.rank,
                   gpu=torch.cuda.get_device_name())
        print(json.dumps(row))


if __name__ == "__main__":
    main()
