"""sd35hub: Hub-native LoRA fine-tuning, publishing and blending for Stable Diffusion 3.5.

Importing this package is cheap: no torch, diffusers or datasets import happens here. The heavy
entry points are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from sd35hub.errors import Sd35HubError  # noqa: E402  (stdlib-only module)

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.config import Config

__all__ = ["__version__", "Sd35HubError", "load_config", "train"]


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) with dotted overrides, validated."""
    from sd35hub.config import load_config as _load

    return _load(path, overrides or [])


def train(config: Any) -> Any:
    """Train a LoRA adapter; see sd35hub.train.recipe."""
    from sd35hub.train.recipe import train as _train

    return _train(config)
