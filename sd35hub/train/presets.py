"""Per-variant presets: values the base model's variant implies, filled where the user set nothing.

    sd3.5-large-turbo   timestep-distilled: validation (and class-image generation) with 4 steps and
                        guidance 0 (no classifier-free guidance), as Stability samples it
    sd3.5-medium        skip-layer guidance on layers 7, 8, 9 at scale 2.8 in the validation grids (the
                        layers StableDiffusion3Pipeline's docs give as Stability's recommendation for Medium)

Anything set in the config (YAML, override or flag) wins; with the Python API a value equal to the
dataclass default counts as unset (like the hardware profiles).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sd35hub.config import Config, TrainSpec

MEDIUM_SKIP_LAYERS = (7, 8, 9)
PRESETS: dict[str, dict[str, Any]] = {
    "sd3.5-large-turbo": {"validation_steps": 4, "validation_guidance": 0.0},
    "sd3.5-medium": {"validation_skip_layers": MEDIUM_SKIP_LAYERS},
}
_DEFAULTS = TrainSpec()


def apply_variant_preset(config: Config, variant: str, explicit: set[str] | None = None) -> tuple[Config, list[str]]:
    """(config with the variant's preset filled in where unset, one note per filled value)."""
    preset = PRESETS.get(variant, {})
    changes, notes = {}, []
    for name, value in preset.items():
        current = getattr(config.train, name)
        unset = f"train.{name}" not in explicit if explicit is not None else current == getattr(_DEFAULTS, name)
        if unset and current != value:
            changes[name] = value
            notes.append(f"train.{name}={value!r} ({variant} preset)")
    if not changes:
        return config, []
    return config.replace(train=dataclasses.replace(config.train, **changes)), notes


def skip_layer_kwargs(train: TrainSpec, guidance: float) -> dict[str, Any]:
    """StableDiffusion3Pipeline kwargs for skip-layer guidance (only with classifier-free guidance)."""
    if not train.validation_skip_layers or guidance <= 1.0:
        return {}
    return {"skip_guidance_layers": list(train.validation_skip_layers),
            "skip_layer_guidance_scale": train.validation_skip_layer_scale}
