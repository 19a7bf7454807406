"""Wall time of each phase before the first optimizer step, counted from the process launch.

    clock = StartupClock(log)              # one line per phase: "startup  0.41 s  config / plan  (at 3.02 s)"
    clock.mark("config / plan")            # closes the segment since the last mark under this name
    with clock.phase("load transformer"):  # or through PhaseRecorder(clock=...): every recorder phase
        ...
    clock.finish()                         # after the first step: "to first step" = launch -> now
    clock.phases                           # {"imports": 2.6, "config / plan": 0.4, ..., "to first step": 9.1}

The segments tile the time from the launch to the first step, so they add up to "to first step"
(rounding aside). "imports" is the launch (the process's start time from /proc) up to the trainer's
setup: the interpreter, torch, diffusers and the caller's own work. A phase entered inside another one
(the VAE loaded inside the step-0 validation) is its own segment, not counted twice.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

_IMPORTED_AT = time.time()
LABELS = {"validate": "step-0 validation"}  # PhaseRecorder names -> the startup's names
TOTAL = "to first step"


def process_start_time() -> float:
    """When this process was launched (epoch seconds): /proc/self/stat's start time against /proc/uptime on
    Linux (10 ms resolution); elsewhere
    the time this module was first imported (later than the launch, so the "imports" phase is short)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime, clock ticks after boot), counted after the ")" of the name
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])  # seconds since boot (10 ms resolution)
        now = time.time()
        start = now - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
        return min(start, _IMPORTED_AT)  # never a launch after our own import
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


class StartupClock:
    def __init__(self, log: Callable[[str], None] | None = None, *, start: float | None = None) -> None:
        self.log = log
        self.start = process_start_time() if start is None else start
        self.last = self.start
        self.phases: dict[str, float] = {}
        self.gap = "other"  # the name of time outside any phase until the next mark
        self.stack: list[str] = []
        self.done = False

    def _now(self) -> float:
        return time.time()

    def mark(self, name: str, *, quiet_below_s: float = 0.0) -> float:
        """Close the segment since the last mark under ``name`` (added to an earlier one of that name)."""
        if self.done:
            return 0.0
        now = self._now()
        seconds = max(now - self.last, 0.0)
        self.last = now
        if seconds < quiet_below_s and name not in self.phases:
            return seconds
        self.phases[name] = round(self.phases.get(name, 0.0) + seconds, 3)
        if self.log is not None:
            self.log(f"startup {seconds:6.2f} s  {name}  (at {now - self.start:.2f} s)")
        return seconds

    def enter(self, name: str) -> None:
        """A phase begins: the time since the last mark belongs to the enclosing phase, or to ``gap``."""
        outer = LABELS.get(self.stack[-1], self.stack[-1]) if self.stack else self.gap
        self.mark(outer, quiet_below_s=0.005)
        self.stack.append(name)

    def leave(self, name: str) -> None:
        self.mark(LABELS.get(name, name))
        if self.stack and self.stack[-1] == name:
            self.stack.pop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave(name)

    def finish(self, name: str = "first step", compile_s: float | None = None) -> dict[str, float]:
        """The first step is done: its segment (less ``compile_s``, reported as "compile" when known),
        and "to first step" from the launch. The clock stops."""
        if self.done:
            return self.phases
        now = self._now()
        seconds = max(now - self.last, 0.0)
        if compile_s:
            compile_s = min(compile_s, seconds)
            self.phases["compile (in the first step)"] = round(compile_s, 3)
            seconds -= compile_s
        self.phases[name] = round(self.phases.get(name, 0.0) + seconds, 3)
        self.phases[TOTAL] = round(now - self.start, 3)
        self.done = True
        if self.log is not None:
            if compile_s:
                self.log(f"startup {compile_s:6.2f} s  compile (in the first step)")
            self.log(f"startup {seconds:6.2f} s  {name}")
            self.log(f"startup {now - self.start:6.2f} s  {TOTAL} (from the process launch)")
        return self.phases


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far (dynamo's own timers; 0 when
    nothing compiled or the counters are unavailable)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover
        return 0.0
    times: Any = compilation_time_metrics.get("_compile.compile_inner") or []
    return float(sum(times))
