"""Does an adapter fit the base? Every LoRA module checked against the base's module shapes, once, on load.

`check_parts(parts, target)` is called by `read_adapter` (every command: adapter-info, convert, merge,
generate, the blend engine) and again by `load_into_pipeline` with the real model. The target is:

* a loaded SD3Transformer2DModel or pipeline: exact names and shapes from its modules;
* a ModelInfo (configs only): the shapes diffusers builds from that config (`transformer_shapes`);
* nothing: the SD3 family member the adapter's width says (1536: SD3/SD3.5 Medium, 2432: SD3.5 Large,
  32: the tiny test model), or, for another width, the shapes relative to that width.

Problems found: wrong in/out features, blocks beyond the model, attn2 on blocks without dual attention,
modules the base does not have. The error names the adapter's architecture and the base's.
"""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING, Any

from sd35hub.adapters.check_te import model_shapes
from sd35hub.errors import AdapterIncompatibleError

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.adapters.formats import Parts
    from sd35hub.adapters.formats_mmdit import LoraModule, Modules
    from sd35hub.models.info import ModelInfo

KNOWN_WIDTHS = {1536: "SD3 / SD3.5 Medium", 2432: "SD3.5 Large / Large Turbo"}
Shape = tuple  # weight shape: (out, in) or (out, in, k, k); None entries match anything
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def describe_width(width: int | None) -> str:
    if width is None:
        return "an SD3-family transformer"
    return f"{KNOWN_WIDTHS.get(width, 'an SD3-family transformer')} ({width} wide)"


def transformer_shapes(info: ModelInfo, *, loose: bool = False) -> dict[str, list[Shape]]:
    """{diffusers module name: allowed weight shapes} of the SD3Transformer2DModel diffusers builds from `info`.

    Mirrors diffusers' SD3 blocks: the last block is context-pre-only (no to_add_out/ff_context, its
    norm1_context is AdaLayerNormContinuous [2W]); dual-attention blocks have attn2 and a 9W norm1.
    `loose`: the widths not derivable from W (context/pooled/patch channels) match anything.
    """
    w = info.hidden_size
    joint = None if loose else info.joint_attention_dim
    pooled = None if loose else info.pooled_projection_dim
    channels = None if loose else info.in_channels
    p = info.patch_size
    shapes: dict[str, list[Shape]] = {
        "context_embedder": [(w, joint)],
        "time_text_embed.timestep_embedder.linear_1": [(w, 256)],
        "time_text_embed.timestep_embedder.linear_2": [(w, w)],
        "time_text_embed.text_embedder.linear_1": [(w, pooled)],
        "time_text_embed.text_embedder.linear_2": [(w, w)],
        "norm_out.linear": [(2 * w, w)],
        "proj_out": [(None if loose else p * p * info.in_channels, w)],
        "pos_embed.proj": [(w, channels, p, p)],
    }
    dual = set(info.dual_attention_layers)
    for i in range(info.num_layers):
        last = i == info.num_layers - 1
        block = {f"attn.{n}": (w, w) for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                "add_v_proj")}  # fmt: skip
        block.update({"ff.net.0.proj": (4 * w, w), "ff.net.2": (w, 4 * w)})
        block["norm1_context.linear"] = (2 * w, w) if last else (6 * w, w)
        if not last:
            block.update({"attn.to_add_out": (w, w), "ff_context.net.0.proj": (4 * w, w),
                          "ff_context.net.2": (w, 4 * w)})  # fmt: skip
        norm1 = [(9 * w, w)] if i in dual else [(6 * w, w)]
        if loose and i in dual:
            norm1.append((6 * w, w))  # SD3 Medium has no attn2: 6W there
        for name, shape in block.items():
            shapes[f"transformer_blocks.{i}.{name}"] = [shape]
        shapes[f"transformer_blocks.{i}.norm1.linear"] = norm1
        if i in dual:
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"transformer_blocks.{i}.attn2.{name}"] = [(w, w)]
    return shapes


def adapter_width(modules: Modules) -> int | None:
    """The transformer width an adapter was made for: the most common input width of its block layers."""
    widths = collections.Counter()
    for name, module in modules.items():
        if (
            _BLOCK.match(name)
            and not name.endswith(("ff.net.2", "ff_context.net.2"))
            or name in ("norm_out.linear", "proj_out")
        ):
            widths[int(module.down.shape[1])] += 1
    return widths.most_common(1)[0][0] if widths else None


def reference_info(width: int | None, blocks: int) -> tuple[ModelInfo, bool, str]:
    """(ModelInfo to check against, loose, its description) when no base model is given."""
    from sd35hub.models.info import ModelInfo, model_info_from_config
    from sd35hub.models.tiny import TRANSFORMER_CONFIG

    if width == 2432:
        return (
            ModelInfo("sd3.5-large", "sd3.5-large", 38, 38, 64, qk_norm="rms_norm"),
            False,
            "SD3.5 Large (38 blocks)",
        )
    if width == 1536:  # SD3 Medium (no attn2) or SD3.5 Medium (attn2 on blocks 0-12): the union
        info = ModelInfo("sd3.5-medium", "sd3.5-medium", 24, 24, 64, dual_attention_layers=tuple(range(13)))
        return info, True, "SD3 / SD3.5 Medium (24 blocks)"
    if width == TRANSFORMER_CONFIG["caption_projection_dim"]:
        return model_info_from_config("tiny", TRANSFORMER_CONFIG), False, "the tiny test model (3 blocks)"
    layers = max(blocks, 1)
    info = ModelInfo(
        "custom", "custom", layers, int(width or 1), 1, dual_attention_layers=tuple(range(layers))
    )
    return info, True, f"an SD3-family transformer {width} wide"


def _fits(module: LoraModule, allowed: list[Shape]) -> str | None:
    """None if the LoRA's delta has one of the allowed weight shapes, else what differs."""
    delta = (int(module.up.shape[0]), *[int(d) for d in module.down.shape[1:]])
    for shape in allowed:
        if len(shape) == len(delta) and all(
            want is None or want == got for want, got in zip(shape, delta, strict=True)
        ):
            bias_ok = module.bias is None or module.bias.numel() == delta[0]
            if bias_ok:
                return None
            return f"its bias delta has {module.bias.numel()} values, the layer {delta[0]} outputs"
    want = " or ".join("x".join("?" if d is None else str(d) for d in s) for s in allowed)
    got = "x".join(str(d) for d in delta)
    return f"the layer's weight is {want}, the adapter's delta {got}"


def _problems(modules: Modules, shapes: dict[str, list[Shape]], num_layers: int, dual: set[int]) -> list[str]:
    problems = []
    for name, module in modules.items():
        allowed = shapes.get(name)
        if allowed is None:
            block = _BLOCK.match(name)
            if block and int(block.group(1)) >= num_layers:
                problems.append(f"{name} is beyond the base's {num_layers} blocks")
            elif block and ".attn2." in name and int(block.group(1)) not in dual:
                problems.append(f"{name}: block {block.group(1)} has no dual attention (attn2)")
            else:
                problems.append(f"the base has no layer {name}")
            continue
        problem = _fits(module, allowed)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def check_transformer(modules: Modules, target: Any = None, *, label: str = "This adapter") -> None:
    """Raise AdapterIncompatibleError unless every transformer LoRA module fits `target` (see module doc)."""
    if not modules:
        return
    blocks = [int(m.group(1)) for name in modules if (m := _BLOCK.match(name))]
    count = max(blocks) + 1 if blocks else 0
    width = adapter_width(modules)
    if target is not None and hasattr(target, "transformer") and hasattr(target, "text_encoder"):
        target = target.transformer  # a pipeline
    if target is None:
        info, loose, base_arch = reference_info(width, count)
        shapes, base_name = transformer_shapes(info, loose=loose), "for that width"
        num_layers, dual = info.num_layers, set(info.dual_attention_layers)
    elif hasattr(target, "named_modules"):
        config = target.config
        base_width = int(config.num_attention_heads * config.attention_head_dim)
        base_name = getattr(config, "_name_or_path", "") or "the base model"
        base_arch = f"{describe_width(base_width)}, {config.num_layers} blocks"
        shapes, num_layers = model_shapes(target), int(config.num_layers)
        dual = set(getattr(config, "dual_attention_layers", ()) or ())
    else:
        base_name, num_layers, dual = target.model_id, target.num_layers, set(target.dual_attention_layers)
        base_arch = f"{describe_width(target.hidden_size)}, {target.num_layers} blocks"
        shapes = transformer_shapes(target)
    problems = _problems(modules, shapes, num_layers, dual)
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise AdapterIncompatibleError(
            f"{label} was made for {describe_width(width)}, at least {count} blocks; the base model {base_name} "
            f"is {base_arch} ({problems[0]}{more}). Use an adapter trained on this base model (check base_model "
            "in its card), or load the base it was trained on."
        )


def check_parts(parts: Parts, target: Any = None, *, label: str = "This adapter") -> None:
    """check_transformer, and each text encoder's LoRA against that text encoder (sd35hub.adapters.check_te)."""
    from sd35hub.adapters.check_te import check_text_encoder

    check_transformer(parts.transformer, target, label=label)
    for component, modules in parts.text_encoders.items():
        model = getattr(target, component, None) if target is not None else None
        check_text_encoder(component, modules, model, label=label)
