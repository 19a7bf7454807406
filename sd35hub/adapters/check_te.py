"""Text-encoder LoRAs (CLIP-L, CLIP-G, T5-XXL) checked against the text encoder's module shapes.

With the loaded text encoder: its exact linear layers. Without: the public configs of SD3's encoders
(CLIP-L 768 wide, 12 layers; CLIP-G 1280, 32 layers; T5-XXL 4096, 24 blocks, d_ff 10240) or the tiny test
model's, picked by the adapter's width; any other width is checked for consistency across its layers.
"""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING, Any

from sd35hub.adapters.formats_keys import TE_LABELS
from sd35hub.errors import AdapterIncompatibleError

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.adapters.formats_mmdit import Modules

# component -> {width: (layers, intermediate, inner attention width)}: SD3's encoders and the tiny ones.
KNOWN = {
    "text_encoder": {768: (12, 3072, 768), 32: (2, 64, 32)},
    "text_encoder_2": {1280: (32, 5120, 1280), 32: (2, 64, 32)},
    "text_encoder_3": {4096: (24, 10240, 4096), 64: (2, 128, 32)},  # tiny T5: 4 heads x d_kv 8
}
_LINEAR_KINDS = ("Linear", "Linear4bit", "Linear8bitLt", "Float8Linear", "QLinear")
_LAYER = re.compile(r"^(?:text_model\.encoder\.layers|encoder\.block)\.(\d+)\.(.+)$")


def model_shapes(model: Any) -> dict[str, list[tuple]]:
    """{module name: [weight shape]} of a loaded torch model's linear and conv layers."""
    out: dict[str, list[tuple]] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.startswith("Conv") and hasattr(module, "weight"):
            out[name] = [tuple(module.weight.shape)]
        elif kind in _LINEAR_KINDS or (hasattr(module, "in_features") and hasattr(module, "out_features")):
            out[name] = [(int(module.out_features), int(module.in_features))]
    return out


def _expected(component: str, leaf: str, width: int, inter: int | None, inner: int | None) -> tuple | None:
    """(out, in) of one layer kind; None entries match anything."""
    if component == "text_encoder_3":
        table = {
            "layer.0.SelfAttention.q": (inner, width), "layer.0.SelfAttention.k": (inner, width),
            "layer.0.SelfAttention.v": (inner, width), "layer.0.SelfAttention.o": (width, inner),
            "layer.1.DenseReluDense.wi_0": (inter, width), "layer.1.DenseReluDense.wi_1": (inter, width),
            "layer.1.DenseReluDense.wi": (inter, width), "layer.1.DenseReluDense.wo": (width, inter),
        }  # fmt: skip
    else:
        table = {
            "self_attn.q_proj": (width, width), "self_attn.k_proj": (width, width),
            "self_attn.v_proj": (width, width), "self_attn.out_proj": (width, width),
            "mlp.fc1": (inter, width), "mlp.fc2": (width, inter),
        }  # fmt: skip
    return table.get(leaf)


def _width(component: str, modules: Modules) -> int | None:
    first = "layer.0.SelfAttention.q" if component == "text_encoder_3" else "self_attn.q_proj"
    counts = collections.Counter(
        int(m.down.shape[1]) for n, m in modules.items() if (g := _LAYER.match(n)) and g.group(2) == first
    )
    if not counts:
        counts = collections.Counter(
            int(m.down.shape[1]) for n, m in modules.items() if "fc1" in n or "wi" in n
        )
    return counts.most_common(1)[0][0] if counts else None


def check_text_encoder(
    component: str, modules: Modules, model: Any = None, *, label: str = "This adapter"
) -> None:
    """Raise AdapterIncompatibleError unless every LoRA module of this text encoder fits it."""
    label_te = TE_LABELS[component]
    problems: list[str] = []
    if model is not None:
        shapes = model_shapes(model)
        for name, module in modules.items():
            got = (int(module.up.shape[0]), int(module.down.shape[1]))
            if name not in shapes:
                problems.append(f"the {label_te} text encoder has no layer {name}")
            elif shapes[name][0] != got:
                problems.append(
                    f"{name} is {shapes[name][0][0]}x{shapes[name][0][1]}, the adapter's {got[0]}x{got[1]}"
                )
    else:
        width = _width(component, modules)
        layers, inter, inner = KNOWN[component].get(width or -1, (None, None, None))
        if layers is None:  # unknown width: intermediate sizes must agree across layers
            inter = _common(modules, ("mlp.fc1", "DenseReluDense.wi"))
            inner = _common(modules, ("SelfAttention.q",)) if component == "text_encoder_3" else width
        for name, module in modules.items():
            got = (int(module.up.shape[0]), int(module.down.shape[1]))
            match = _LAYER.match(name)
            if match is None:  # text_projection: out is the projection width, in the hidden width
                if width is not None and got[1] != width:
                    problems.append(f"{name} takes {got[1]} inputs, the encoder is {width} wide")
                continue
            if layers is not None and int(match.group(1)) >= layers:
                problems.append(f"{name} is beyond the {label_te} encoder's {layers} layers")
                continue
            want = _expected(component, match.group(2), width or got[1], inter, inner)
            if want is None or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
                shown = "x".join("?" if w is None else str(w) for w in want) if want else "not a LoRA layer"
                problems.append(f"{name}: the layer is {shown}, the adapter's {got[0]}x{got[1]}")
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise AdapterIncompatibleError(
            f"{label}'s {label_te} text-encoder LoRA does not fit the base's {label_te} encoder "
            f"({problems[0]}{more}). Use an adapter trained on this base model."
        )


def _common(modules: Modules, fragments: tuple[str, ...]) -> int | None:
    counts = collections.Counter(
        int(m.up.shape[0]) for n, m in modules.items() if any(f in n for f in fragments)
    )
    return counts.most_common(1)[0][0] if counts else None
