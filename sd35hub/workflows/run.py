"""What a run will train, ready for any front end: the RunPlan (the config the trainer gets and the same config
with the hardware profile applied, for showing) and prepare_run (where checkpoints go, and whether the run resumes).

prepare_run decides and returns the decision (RunStart); it prints nothing and names no front end's storage:
a front end that can mount persistent storage passes its root and its mount function (the notebook: Google
Drive at /content/drive, sd35hub.frontends.colab.prepare_run, which also words the decision for its reader).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35hub.config import Config


@dataclass
class RunPlan:
    """The validated config, resolved against the hardware profile, and what the user chose."""

    config: Config  # what the trainer gets: the profile's choices are left open (None), the trainer makes them
    resolved: Config  # the same config with the profile applied (what will actually run; shown to the user)
    notes: list[str] = field(default_factory=list)  # where each resolved setting came from

    @property
    def output_dir(self) -> Path:
        return Path(self.config.train.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.train.checkpoint_dir or self.output_dir / "checkpoints")

    def replace(self, **sections: Any) -> RunPlan:
        """Replace fields of sections in both configs: ``plan.replace(train={"resume": "latest"})``."""

        def apply(config: Config) -> Config:
            changed = {
                name: dataclasses.replace(getattr(config, name), **values)
                for name, values in sections.items()
            }
            return config.replace(**changed).validate()

        return dataclasses.replace(self, config=apply(self.config), resolved=apply(self.resolved))

    def describe(self) -> str:
        c = self.resolved
        lines = [
            f"model {c.model.name} | data {c.data.source} @ {c.data.resolution} px, trigger {c.data.trigger_word!r}",
            f"LoRA rank {c.lora.rank} on {c.lora.targets} | "
            + (f"{c.train.max_steps} steps" if c.train.max_steps else f"{c.train.epochs} epochs")
            + f", lr {c.train.learning_rate}, batch {c.train.batch_size} x {c.train.gradient_accumulation}",
            f"output {c.train.output_dir} | checkpoints {self.checkpoint_dir} every {c.train.checkpoint_every} steps"
            f" | validation every {c.train.validation_every or 'start/end'} | repo {c.hub.repo_id or '(after login)'}",
        ]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def resolve_plan(config: Config, profile: Any = None) -> RunPlan:
    """A validated config -> its RunPlan: with a hardware profile, the settings it fills in (the trainer
    repeats the same resolution on its own config, with the same result) and where each came from."""
    resolved, notes = config, []
    if profile is not None:
        from sd35hub.hardware import apply_profile

        resolved, notes = apply_profile(config, profile)
    return RunPlan(config=config, resolved=resolved, notes=notes)


@dataclass(frozen=True)
class RunStart:
    """What prepare_run decided: the plan to train, and why (for a front end to tell its user)."""

    plan: RunPlan  # checkpoint_dir and resume as decided
    requested_dir: str | None  # the checkpoint_dir asked for when it lies under ``mount_root``, else None
    mounted: bool  # that storage was mounted; False with a requested_dir: the checkpoints go next to the output
    found: int  # complete checkpoints in plan.checkpoint_dir
    resume_from: str | None  # the newest one's folder name: the run resumes from it (None: from step 0)


def prepare_run(
    plan: RunPlan, *, mount: Callable[[], Path | None] | None = None, mount_root: str | None = None
) -> RunStart:
    """Where checkpoints go and whether the run resumes. A checkpoint_dir under ``mount_root`` (persistent
    storage a front end can mount) is kept when ``mount()`` returns the mounted root, and dropped when it
    returns None (not available here: the checkpoints go next to the output); any other checkpoint_dir is
    kept as it is. ``resume="latest"`` when a complete checkpoint exists there already (a re-run after a
    disconnect continues instead of starting over), else ``resume=None``."""
    from sd35hub.train.checkpoint import list_checkpoints

    requested = plan.config.train.checkpoint_dir
    on_mount = bool(requested and mount_root and requested.startswith(mount_root))
    mounted = on_mount and mount is not None and mount() is not None
    if on_mount and not mounted:
        plan = plan.replace(train={"checkpoint_dir": None})
    found = list_checkpoints(plan.checkpoint_dir)
    plan = plan.replace(train={"resume": "latest" if found else None})
    return RunStart(plan=plan, requested_dir=requested if on_mount else None, mounted=mounted, found=len(found),
                    resume_from=found[-1].name if found else None)  # fmt: skip
