"""Metrics: one JSON line per logged step (OUTPUT/logs/metrics.jsonl), and the loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sd35hub.paths import atomic_write


class PendingLog:
    """A log point's record and its loss, copied to pinned host memory without waiting for the GPU;
    :meth:`loss` waits for that copy only (the trainer reads it one step later)."""

    def __init__(self, record: dict[str, Any], loss: Any, extras: dict[str, Any] | None = None) -> None:
        import torch

        self.record, self.event = record, None
        self.names = list(extras or {})  # more 0-d losses logged next to "loss" (e.g. instance_loss, prior_loss)
        loss = loss.detach()
        if self.names:
            loss = torch.stack([loss.reshape(()), *(extras[n].detach().reshape(()).to(loss) for n in self.names)])
        if loss.is_cuda:
            self.host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = loss

    def loss(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host[0] if self.names else self.host)

    def extras(self) -> dict[str, float]:
        if self.event is not None:
            self.event.synchronize()
        return {name: float(self.host[i + 1]) for i, name in enumerate(self.names)}


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped (they were not kept)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.is_file():
            kept = [line for line in self.read() if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per step (raw and smoothed) and validation loss points -> PNG. None when no data."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["validation_loss"]) for r in records if r.get("validation_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="train loss")
        smooth, ema = [], losses[0]
        for value in losses:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax.plot(steps, smooth, color="#247", linewidth=1.6, label="train loss (EMA 0.9)")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="#c42", label="held-out loss (fixed noise)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(Path(path), lambda temp: fig.savefig(temp, format="png"))
    finally:
        plt.close(fig)
