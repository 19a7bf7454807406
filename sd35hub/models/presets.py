"""Per-variant presets: values the base model's variant implies, filled where the user set nothing.

    sd3.5-large-turbo   timestep-distilled: validation (and class-image generation) with 4 steps and
                        guidance 0 (no classifier-free guidance), as Stability samples it
    sd3.5-medium        skip-layer guidance on layers 7, 8, 9 at scale 2.8 in the validation grids (the
                        layers StableDiffusion3Pipeline's docs give as Stability's recommendation for Medium)

Like the hardware profile, a preset is a layer below the config: it fills only the fields left ``None``
(anything set in YAML, a flag, an override or ``TrainSpec(...)`` wins), and the fields no preset names get
their plain defaults (VALIDATION_DEFAULTS).
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
# what an unset (None) field becomes when the variant has no preset for it
VALIDATION_DEFAULTS: dict[str, Any] = {"validation_steps": 28, "validation_guidance": 4.5, "validation_skip_layers": ()}


def apply_variant_preset(config: Config, variant: str) -> tuple[Config, list[str]]:
    """(config with every unset preset field filled: the variant's value, else the plain default; one note
    per value a preset chose)."""
    preset = PRESETS.get(variant, {})
    changes, notes = {}, []
    for name, default in VALIDATION_DEFAULTS.items():
        if getattr(config.train, name) is not None:
            continue
        changes[name] = preset.get(name, default)
        if name in preset:
            notes.append(f"train.{name}={preset[name]!r} ({variant} preset)")
    if not changes:
        return config, []
    return config.replace(train=dataclasses.replace(config.train, **changes)), notes


def skip_layer_kwargs(train: TrainSpec, guidance: float) -> dict[str, Any]:
    """StableDiffusion3Pipeline kwargs for skip-layer guidance (only with classifier-free guidance)."""
    if not train.validation_skip_layers or guidance <= 1.0:
        return {}
    return {"skip_guidance_layers": list(train.validation_skip_layers),
            "skip_layer_guidance_scale": train.validation_skip_layer_scale}
