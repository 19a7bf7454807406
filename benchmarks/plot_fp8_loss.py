"""Loss per step of the same `sd35hub train` run with bf16 and with FP8 base layers (gpu_runs.sh fp8-train).

usage: python benchmarks/plot_fp8_loss.py RESULTS_DIR OUT.png   (RESULTS_DIR holds large_bf16/large_fp8.metrics.jsonl)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def losses(path: Path) -> dict[int, float]:
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    bf16, fp8 = losses(results / "large_bf16.metrics.jsonl"), losses(results / "large_fp8.metrics.jsonl")
    steps = sorted(bf16.keys() & fp8.keys())
    gap = max(abs(bf16[s] - fp8[s]) for s in steps)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    top.plot(steps, [bf16[s] for s in steps], label="bf16 base", lw=2)
    top.plot(steps, [fp8[s] for s in steps], label="FP8 base (model.float8)", lw=1, ls="--")
    top.set_ylabel("training loss")
    top.set_title("SD3.5 Large architecture, batch 2 at 1024 px, same seed and data")
    top.legend()
    bottom.plot(steps, [fp8[s] - bf16[s] for s in steps], color="tab:red")
    bottom.set_ylabel("FP8 − bf16")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"{len(steps)} steps, largest |FP8 - bf16| = {gap:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
