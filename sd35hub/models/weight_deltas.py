"""Exact weight deltas on a model's Linear layers, for adapters that are not a low-rank pair (DoRA, LoKr,
LoHa: sd35hub.train.variants), blended by weight:

    W' = W + sum_i weight_i * delta_i(W)        (fp32, cast to W's dtype)

Each affected ``nn.Linear`` gets a ``torch.nn.utils.parametrize`` parametrization of its weight that
computes this from the adapters' factors on every forward (the factors stay small: no full-size copy is
kept, and removing the last adapter restores the original weight object untouched). Works under peft
LoRA layers (they call their base Linear), so LoRA and variant adapters blend together. A weight of 0
switches an adapter off. DoRA's delta is taken against the unmodified base weight, as peft does for
several adapters and as ComfyUI does for strength != 1 (strength * (W_dora - W)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from sd35hub.errors import AdapterError


class WeightDeltas(torch.nn.Module):
    """Parametrization of one Linear weight: original + sum of weighted deltas."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module
        self.adapters: dict[str, Any] = {}  # name -> VariantAdapter (factors moved with .to(), see apply)
        self.weights: dict[str, float] = {}

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        active = [(n, w) for n, w in self.weights.items() if w != 0.0 and n in self.adapters]
        if not active:
            return original
        base = original.float()
        total = torch.zeros_like(base)
        for name, weight in active:
            total += weight * self.adapters[name].delta(self.module, base)
        return (base + total).to(original.dtype)


def base_linear(model: Any, name: str) -> torch.nn.Linear:
    """The plain Linear at ``name`` (under a peft LoRA layer: its base layer)."""
    module = model.get_submodule(name)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, torch.nn.Linear) or not base.weight.is_floating_point() or \
            type(base.weight).__name__ not in ("Parameter", "Tensor"):
        raise AdapterError(f"{name} is a {type(base).__name__} with a {type(base.weight).__name__} weight: DoRA, LoKr "
                           "and LoHa adapters apply to an unquantized base only (generate without --quantize)")
    return base


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the model's Linear layers, peft's '.base_layer' folded into the layer's own name."""
    return {n.removesuffix(".base_layer"): (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".lora_" not in n}


def _deltas(linear: torch.nn.Linear) -> WeightDeltas | None:
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    return next((p for p in linear.parametrizations.weight if isinstance(p, WeightDeltas)), None)


def apply(model: Any, name: str, variant: Any) -> None:
    """Attach ``variant`` (a VariantAdapter) under ``name``, at weight 0 (off) until set_weights."""
    device = next(model.parameters()).device
    variant.factors = {m: {k: v.to(device) for k, v in parts.items()} for m, parts in variant.factors.items()}
    linears = {module: base_linear(model, module) for module in variant.factors}  # all checked before any change
    for module, linear in linears.items():
        deltas = _deltas(linear)
        if deltas is None:
            deltas = WeightDeltas(module)
            parametrize.register_parametrization(linear, "weight", deltas, unsafe=True)
        deltas.adapters[name] = variant
        deltas.weights[name] = 0.0


def _all(model: Any) -> list[tuple[torch.nn.Linear, WeightDeltas]]:
    out = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            deltas = _deltas(module)
            if deltas is not None:
                out.append((module, deltas))
    return out


def names(model: Any) -> set[str]:
    return {n for _, d in _all(model) for n in d.adapters}


def set_weights(model: Any, weights: dict[str, float]) -> None:
    """Each attached adapter at its weight in ``weights`` (absent: 0, off)."""
    for _, deltas in _all(model):
        for name in deltas.adapters:
            deltas.weights[name] = float(weights.get(name, 0.0))


def remove(model: Any, name: str) -> None:
    """Detach one adapter; a Linear left with none gets its original weight back (the same tensor)."""
    for linear, deltas in _all(model):
        deltas.adapters.pop(name, None)
        deltas.weights.pop(name, None)
        if not deltas.adapters:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
