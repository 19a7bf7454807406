"""Data-parallel helpers for the trainer (``accelerate launch -m sd35hub train``); see docs/training.md.

Only what accelerate does not do by itself: run several launched processes on the CPU as one job, and
let all processes agree on stopping after the same step.
"""

from __future__ import annotations

import os
from typing import Any


def launched_without_cuda() -> bool:
    """True when torchrun / ``accelerate launch --multi_gpu`` started several processes but no CUDA GPU is
    visible. Pass it as ``Accelerator(cpu=...)``: without it accelerate 1.15 leaves each process on its own
    (P copies of the whole run writing the same files) instead of joining them over gloo."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def any_process(acc: Any, flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (one tiny all-reduce; blocks the host).

    Used for SIGTERM: a launcher's signal reaches the processes at slightly different times, and a
    process that stops one step early would wait in the checkpoint barrier while the others wait in the
    next step's gradient all-reduce."""
    if acc.num_processes == 1:
        return flag
    import torch

    flags = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(flags, reduction="sum").item() > 0)


def check_same_resume_step(acc: Any, step: int, checkpoint_dir: Any) -> None:
    """Every process must resume from the same step (each reads the checkpoint itself). Different steps mean
    the machines see different checkpoint folders: a ConfigError on every process instead of a hang."""
    if acc.num_processes == 1:
        return
    import torch

    from sd35hub.errors import ConfigError

    steps = acc.gather(torch.tensor([step], device=acc.device)).tolist()
    if len(set(steps)) > 1:
        raise ConfigError(
            f"train.resume: the processes found checkpoints at different steps {steps} in {checkpoint_dir}; on "
            "several machines put train.checkpoint_dir (or --output) on storage that every machine reads"
        )
