"""Measured memory and time per phase of a run, and out-of-memory errors that name the phase.

    recorder = PhaseRecorder(device, plan=memory_plan)
    with recorder.phase("encode captions (T5-XXL)", items=len(texts)):
        ...                                # torch.OutOfMemoryError -> OutOfMemoryError(phase, remedy)
    recorder.report()                      # {phase: {gpu_peak_allocated_gib, gpu_peak_reserved_gib, host_peak_gib, ...}}

Phases nest (validation runs inside training): entering one closes the current segment and resumes
it afterwards, so each phase's peak is its own. GPU peaks come from torch.cuda.max_memory_allocated /
max_memory_reserved (reset at each boundary); host peaks from VmHWM in /proc/self/status, reset at each
boundary through /proc/self/clear_refs (Linux), so ``host_peak_gib`` of a phase is that phase's peak of
the whole process's resident set (file-backed pages included; ``host_anon_gib`` is RssAnon at its end).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sd35hub.errors import OutOfMemoryError

GIB = 2**30
REMEDIES = {
    "encode images (VAE)": "lower data.resolution (the VAE already encodes one image at a time)",
    "encode captions (CLIP-L)": "free the GPU of other processes (CLIP-L alone is 0.3 GB)",
    "encode captions (CLIP-G)": "free the GPU of other processes (CLIP-G alone is 1.4 GB)",
    "encode captions (T5-XXL)": "model.text_encoder_quantize=nf4 (or int8; needs bitsandbytes), or model.drop_t5=true",
    "encode captions (all encoders)": "model.drop_t5=true (every encoder of a loaded pipeline is in memory at once)",
    "generate class images": "model.quantize=nf4, a lower data.resolution, or class images of your own (data.class_data)",
    "load transformer": "model.quantize=nf4 (bitsandbytes), or model.name=stabilityai/stable-diffusion-3.5-medium",
    "train": "train.gradient_checkpointing=true, model.quantize=nf4, a lower data.resolution or train.batch_size=1",
    "validate": "a lower data.resolution or fewer train.validation_prompts (training itself fitted)",
    "save / publish": "nothing on the GPU should grow here: report it (SD35HUB_DEBUG=1)",
}


def _status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process in bytes ({} where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_host_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class PhaseRecorder:
    def __init__(self, device: Any, plan: Any = None, clock: Any = None) -> None:
        import torch

        self.cuda = getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available()
        self.device, self.plan = device, plan
        self.clock = clock  # sd35hub.train.startup.StartupClock: wall time of each phase before the first step
        self.phases: dict[str, dict[str, Any]] = {}
        self.stack: list[str] = []
        self.started: float = time.perf_counter()
        self.host_peak = 0  # of the whole process over every segment
        self.gpu_peak = 0

    def _close_segment(self) -> None:
        """Fold the peaks since the last boundary into the current phase; reset them."""
        import torch

        status = _status()
        host = status.get("VmHWM", 0)
        self.host_peak = max(self.host_peak, host)
        gpu_alloc = gpu_reserved = 0
        if self.cuda:
            gpu_alloc = torch.cuda.max_memory_allocated(self.device)
            gpu_reserved = torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.gpu_peak = max(self.gpu_peak, gpu_reserved)
        now = time.perf_counter()
        if self.stack:
            entry = self.phases[self.stack[-1]]
            entry["gpu_peak_allocated_gib"] = max(entry["gpu_peak_allocated_gib"], round(gpu_alloc / GIB, 3))
            entry["gpu_peak_reserved_gib"] = max(entry["gpu_peak_reserved_gib"], round(gpu_reserved / GIB, 3))
            entry["host_peak_gib"] = max(entry["host_peak_gib"], round(host / GIB, 3))
            entry["host_anon_gib"] = round(status.get("RssAnon", 0) / GIB, 3)
            entry["seconds"] = round(entry["seconds"] + now - self.started, 3)
        self.started = now
        _reset_host_peak()

    @contextmanager
    def phase(self, name: str, items: int | None = None) -> Iterator[dict[str, Any]]:
        import torch

        self._close_segment()
        entry = self.phases.setdefault(name, {"gpu_peak_allocated_gib": 0.0, "gpu_peak_reserved_gib": 0.0,
                                              "host_peak_gib": 0.0, "host_anon_gib": 0.0, "seconds": 0.0})  # fmt: skip
        entry["items"] = entry.get("items", 0) + (items or 0)  # callers may add to it: entry["items"] += n
        self.stack.append(name)
        if self.clock is not None:
            self.clock.enter(name)
        try:
            yield entry
        except torch.OutOfMemoryError as exc:
            raise self.out_of_memory(name) from exc
        finally:
            if self.clock is not None:
                self.clock.leave(name)
            self._close_segment()
            self.stack.pop()
            if entry.get("items") and entry["seconds"] > 0:
                entry["items_per_s"] = round(entry["items"] / entry["seconds"], 3)

    def out_of_memory(self, name: str) -> OutOfMemoryError:
        predicted = ""
        if self.plan is not None:
            phase = next((p for p in self.plan.phases if p.name == name), None)
            if phase is not None:
                predicted = (f" The memory plan predicted ~{phase.gpu_gib:.1f} GiB for this phase with a budget of "
                             f"{self.plan.inputs.gpu_budget_gib:.1f} GiB; another process may hold GPU memory.")  # fmt: skip
        remedy = REMEDIES.get(name, "a smaller data.resolution or train.batch_size")
        return OutOfMemoryError(f"Out of GPU memory in the phase '{name}'. Fix: {remedy}.{predicted}")

    def report(self) -> dict[str, Any]:
        phases = {}
        for name, entry in self.phases.items():
            row = dict(entry)
            if self.plan is not None:
                planned = next((p for p in self.plan.phases if p.name == name), None)
                if planned is not None:
                    row.update(predicted_gpu_gib=planned.gpu_gib, predicted_host_gib=planned.host_gib)
            phases[name] = row
        return {"phases": phases, "host_peak_gib": round(self.host_peak / GIB, 3),
                "gpu_peak_reserved_gib": round(self.gpu_peak / GIB, 3),
                "plan": self.plan.as_dict() if self.plan is not None else None}  # fmt: skip
