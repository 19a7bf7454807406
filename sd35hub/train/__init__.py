"""The training engine: rectified-flow LoRA training of the SD3 transformer.

    flow.py         timestep sampling, shift, loss weighting, the loss itself (pure functions)
    lora.py         peft LoRA on SD3Transformer2DModel: presets, block selection, fp32 adapter weights
    optim.py        optimizer, LR schedule, EMA, the standalone optimizer step
    checkpoint.py   atomic, resumable checkpoints
    validation.py   validation image grids and the held-out loss
    metrics.py      JSONL metrics, progress line, loss plot
    recipe.py       the trainer: setup -> train -> save -> cleanup; ``train(config)``

Importing this package imports nothing heavy; import the submodules you need.
"""

from __future__ import annotations

from typing import Any


def train(config: Any, **kwargs: Any) -> Any:
    """See :func:`sd35hub.train.recipe.train`."""
    from sd35hub.train.recipe import train as _train

    return _train(config, **kwargs)


class _CallableModule(__import__("types").ModuleType):
    """``import sd35hub.train.flow`` rebinds ``sd35hub.train`` from the function in sd35hub/__init__.py
    to this package; making the package callable keeps ``sd35hub.train(config)`` working either way."""

    def __call__(self, config: Any, **kwargs: Any) -> Any:
        return train(config, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
