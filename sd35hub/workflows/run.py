"""What a run will train, ready for any front end: the RunPlan (the config the trainer gets and the same config
with the hardware profile applied, for showing) and prepare_run (where checkpoints go, and whether the run resumes).

The notebook's cells call these through sd35hub.frontends.colab, which adds only what is Colab's own: mounting
Google Drive and printing the lines returned here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35hub.config import Config

DRIVE_ROOT = "/content/drive"


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


def prepare_run(
    plan: RunPlan, *, mount_drive: Callable[[], Path | None] = lambda: None, drive_root: str = DRIVE_ROOT
) -> tuple[RunPlan, list[str]]:
    """Checkpoints on Google Drive when asked for and ``mount_drive()`` gives it (None: not available, so
    they go next to the output); ``resume="latest"`` when a complete checkpoint exists there already (a
    re-run after a disconnect continues instead of starting over). Returns the plan and what to tell the user."""
    from sd35hub.train.checkpoint import list_checkpoints

    lines: list[str] = []
    requested = plan.config.train.checkpoint_dir
    if requested and requested.startswith(drive_root):
        if mount_drive() is None:
            lines.append(
                f"Google Drive is only available in Colab: checkpoints go to {plan.output_dir / 'checkpoints'}"
            )
            plan = plan.replace(train={"checkpoint_dir": None})
        else:
            lines.append(f"checkpoints on Google Drive: {requested} (they survive a disconnect)")
    found = list_checkpoints(plan.checkpoint_dir)
    if found:
        lines.append(f"found {len(found)} checkpoint(s) in {plan.checkpoint_dir}: resuming from {found[-1].name}")
        return plan.replace(train={"resume": "latest"}), lines
    lines.append(f"no checkpoint in {plan.checkpoint_dir}: starting from step 0")
    return plan.replace(train={"resume": None}), lines
