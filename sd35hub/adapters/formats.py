"""SD3 LoRA key layouts: read any of them into one representation, write diffusers, kohya or ComfyUI.

Pure state-dict work (torch tensors in, torch tensors out); no model is needed. The key names of every
layout are in sd35hub.adapters.formats_keys and docs/formats.md. In short, for transformer block N:

    diffusers/peft   transformer.transformer_blocks.N.attn.to_q.lora_A.weight        [r, in]
                     transformer.transformer_blocks.N.attn.to_q.lora_B.weight        [out, r]
                     (alpha lives in the safetensors header, `lora_adapter_metadata`)
    kohya sd-scripts lora_unet_joint_blocks_N_x_block_attn_qkv.lora_down.weight      [r, in]
                     lora_unet_joint_blocks_N_x_block_attn_qkv.lora_up.weight        [3*out, r]
                     lora_unet_joint_blocks_N_x_block_attn_qkv.alpha                 scalar
    ComfyUI          diffusion_model.joint_blocks.N.x_block.attn.qkv.lora_down.weight (same tensors)

kohya and ComfyUI use the original SD3 (MMDiT) module names, where q, k and v are ONE fused linear
(`attn.qkv`); diffusers splits them. Both directions are exact (see `fuse_qkv` / `split_qkv`).

The in-between representation is `Modules`: {diffusers module path: LoraModule(down, up, alpha, bias)},
e.g. "transformer_blocks.0.attn.to_q", and for text encoders {component: Modules} keyed by the HF
model's own module names ("text_model.encoder.layers.0.self_attn.q_proj"). Every conversion goes through it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35hub.adapters.formats_keys import TEXT_ENCODERS, TRANSFORMER, ParsedKey, parse_key, te_key
from sd35hub.adapters.formats_mmdit import LoraModule, Modules, from_mmdit, fuse_qkv, split_qkv, to_mmdit
from sd35hub.adapters.formats_values import check_alpha, check_tensor, diff_as_lora
from sd35hub.errors import AdapterError, AdapterIncompatibleError

__all__ = [
    "FORMATS", "LoraModule", "Modules", "Parts", "detect_format", "foreign_architecture", "fuse_qkv",
    "split_qkv", "modules_from_state_dict", "parts_from_state_dict", "to_state_dict", "lora_config_for",
    "to_mmdit", "from_mmdit",
]  # fmt: skip

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya", "comfyui")  # what we write
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
PATCH = 2  # every SD3 / SD3.5 transformer patchifies 2x2 (flattened conv LoRAs are reshaped with it)


# Key fragments of other architectures -> their name, for AdapterIncompatibleError.
FOREIGN_MARKERS: tuple[tuple[str, str], ...] = (
    ("double_blocks", "FLUX.1"),
    ("single_blocks", "FLUX.1"),
    ("single_transformer_blocks", "FLUX.1"),
    ("lora_unet_down_blocks", "Stable Diffusion XL / 1.x (UNet)"),
    ("lora_unet_up_blocks", "Stable Diffusion XL / 1.x (UNet)"),
    ("lora_unet_mid_block", "Stable Diffusion XL / 1.x (UNet)"),
    ("lora_unet_input_blocks", "Stable Diffusion XL / 1.x (UNet)"),
    ("lora_unet_output_blocks", "Stable Diffusion XL / 1.x (UNet)"),
    ("unet.down_blocks", "Stable Diffusion XL / 1.x (UNet)"),
    ("unet.up_blocks", "Stable Diffusion XL / 1.x (UNet)"),
    ("unet.mid_block", "Stable Diffusion XL / 1.x (UNet)"),
    ("down_blocks.0.attentions", "Stable Diffusion XL / 1.x (UNet)"),
    ("input_blocks.", "Stable Diffusion XL / 1.x (UNet)"),
)


@dataclass
class Parts:
    """Everything one adapter file holds: the transformer's LoRA and each text encoder's."""

    transformer: Modules = field(default_factory=dict)
    text_encoders: dict[str, Modules] = field(default_factory=dict)  # text_encoder, _2, _3 -> Modules
    layout: str = "diffusers"  # the layout the transformer keys were in
    dropped: int = 0  # exactly-zero ComfyUI diffs that were dropped (no effect)


def foreign_architecture(keys: list[str]) -> str | None:
    """The other architecture an adapter was made for ("FLUX.1", "Stable Diffusion XL / 1.x (UNet)"), or None."""
    for key in keys:
        for marker, arch in FOREIGN_MARKERS:
            if marker in key:
                return arch
    return None


_LAYOUT_NAMES = {"peft": "diffusers", "onetrainer": "onetrainer", "lycoris": "lycoris"}


def detect_format(state_dict: dict[str, Any]) -> str:
    """The layout of an SD3 LoRA state dict: diffusers (also peft), kohya, comfyui, onetrainer, lycoris."""
    keys = list(state_dict)
    if not keys:
        raise AdapterError(
            "The adapter file holds no tensors. Re-export it, or check you picked the right file."
        )
    arch = foreign_architecture(keys)
    if arch is not None:
        raise AdapterIncompatibleError(
            f"This adapter is a LoRA for {arch} (keys like {_example(keys)!r}), not for Stable Diffusion 3.5 "
            "(an MMDiT transformer). Use an SD3.5 LoRA with this base model, or that adapter with its own base."
        )
    parsed = [parse_key(k) for k in keys]
    layouts = collections.Counter(p.layout for p in parsed if p.component == TRANSFORMER)
    if not layouts:
        layouts = collections.Counter(p.layout for p in parsed)
    layout = layouts.most_common(1)[0][0]
    return _LAYOUT_NAMES.get(layout, layout)


def _example(keys: list[str]) -> str:
    return sorted(keys)[0]


# --- reading -------------------------------------------------------------------------------------


def parts_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    configs: dict[str, dict[str, Any]] | None = None,
    *,
    split_qkv_members: bool = False,
) -> Parts:
    """Any supported layout -> Parts. `configs`: peft LoraConfig dicts per component (diffusers header).

    `split_qkv_members`: the file is a kohya `split_qkv=True` network (ss_network_args): its fused qkv
    LoRAs were trained as three rank-r/3 members, each with scale alpha / (r/3).
    """
    if not state_dict:
        raise AdapterError(
            "The adapter file holds no tensors. Re-export it, or check you picked the right file."
        )
    arch = foreign_architecture(list(state_dict))
    if arch is not None:
        detect_format(state_dict)  # raises the named error
    grouped: dict[tuple[str, str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    layouts: collections.Counter[str] = collections.Counter()
    for key, tensor in state_dict.items():
        parsed = parse_key(key)
        check_tensor(key, tensor, parsed.leaf)
        slot = grouped.setdefault((parsed.component, parsed.namespace, parsed.module), {})
        if parsed.leaf in slot:
            raise AdapterError(
                f"Duplicate LoRA tensors for {parsed.module!r}: {slot[parsed.leaf][0]!r} and {key!r} are the "
                "same weight under two names (e.g. prefixed and bare). Keep one of them and re-export."
            )
        slot[parsed.leaf] = (key, tensor)
        if parsed.component == TRANSFORMER:
            layouts[parsed.layout] += 1
    configs = configs or {}
    parts = Parts(layout=_LAYOUT_NAMES.get(layouts.most_common(1)[0][0], layouts.most_common(1)[0][0])
                  if layouts else "diffusers")  # fmt: skip
    diffusers_named: Modules = {}
    mmdit_named: Modules = {}
    for (component, namespace, name), leaves in sorted(grouped.items()):
        module, dropped = _build_module(
            name, leaves, configs.get(component), namespace == "mmdit" and split_qkv_members
        )
        parts.dropped += dropped
        if module is None:
            continue
        if component == TRANSFORMER:
            (mmdit_named if namespace == "mmdit" else diffusers_named)[name] = module
        else:
            parts.text_encoders.setdefault(component, {})[name] = module
    converted = from_mmdit(mmdit_named) if mmdit_named else {}
    both = sorted(set(converted) & set(diffusers_named))
    if both:
        raise AdapterError(
            f"The file holds LoRA weights for {both[0]!r} twice, in two layouts (MMDiT and diffusers names). "
            "Keep one layout and re-export."
        )
    parts.transformer = dict(sorted({**diffusers_named, **converted}.items()))
    if parts.dropped:
        log.info("Dropped %d all-zero ComfyUI .diff/.diff_b tensors (they change nothing)", parts.dropped)
    return parts


def _build_module(
    name: str, leaves: dict[str, tuple[str, torch.Tensor]], config: dict[str, Any] | None, split_members: bool
) -> tuple[LoraModule | None, int]:
    """One module's tensors -> LoraModule (or None when all it had were zero diffs), zero diffs dropped."""
    dropped = 0
    module: LoraModule | None = None
    if "down" in leaves or "up" in leaves:
        if "down" not in leaves or "up" not in leaves:
            missing = "down (lora_A/lora_down)" if "down" not in leaves else "up (lora_B/lora_up)"
            raise AdapterError(f"LoRA module {name!r} has no {missing} matrix: the file is incomplete.")
        down, up = _pair(name, leaves["down"][1], leaves["up"][1])
        rank = int(down.shape[0])
        if "alpha" in leaves:
            alpha = check_alpha(leaves["alpha"][0], leaves["alpha"][1])
            if split_members and name.endswith(".qkv") and rank % 3 == 0:
                alpha *= 3.0  # trained as three rank-r/3 members with scale alpha/(r/3)
        else:
            alpha = _config_alpha(name, rank, config)
        module = LoraModule(down=down, up=up, alpha=alpha)
        if "lora_bias" in leaves:  # peft lora_bias: lora_B's bias, scaled like the rest
            module.bias = leaves["lora_bias"][1].float() * module.scale
    elif "alpha" in leaves or "lora_bias" in leaves:
        key = (leaves.get("alpha") or leaves["lora_bias"])[0]
        raise AdapterError(f"{key!r} has no LoRA matrices next to it: the file is incomplete.")
    if "diff" in leaves:
        key, diff = leaves["diff"]
        if not diff.any():
            dropped += 1
        elif diff.ndim < 2:
            raise AdapterError(
                f"{key!r} is a ComfyUI full delta on a 1-D weight (a norm scale). diffusers/peft LoRAs can only "
                "change linear and conv layers, so this part cannot be applied here; use the file in ComfyUI, "
                "or save it again with ComfyUI LoraSave bias_diff=False."
            )
        elif module is not None:
            raise AdapterError(
                f"{key!r}: the file holds both a LoRA and a full delta for {name!r}; ComfyUI would apply only "
                "the delta, so the intended result is ambiguous. Keep one of them and re-export."
            )
        else:
            module = diff_as_lora(diff)
    if "diff_b" in leaves:
        key, diff_b = leaves["diff_b"]
        if diff_b.ndim != 1:
            raise AdapterError(f"{key!r}: a bias delta must be 1-D, not {tuple(diff_b.shape)}.")
        if not diff_b.any():
            dropped += 1
        else:
            if module is None:
                raise AdapterError(
                    f"{key!r} is a bias delta on a layer without a LoRA or weight delta in this file; sd35hub "
                    "applies bias deltas through peft's lora_B bias, which needs the layer's LoRA. Re-export with "
                    "the layer's weights (ComfyUI LoraSave), or without bias_diff."
                )
            module.bias = (module.bias if module.bias is not None else 0) + diff_b.float()
    return module, dropped


def _pair(name: str, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Down/up as a linear pair or peft's conv pair; TrainLoraNode's flattened conv LoRA is reshaped."""
    if down.ndim == 2 and up.ndim == 2 and name in ("pos_embed.proj", "x_embedder.proj"):
        if down.shape[1] % (PATCH * PATCH):
            raise AdapterError(
                f"LoRA module {name!r}: a flattened patch-embedding LoRA needs in = channels x {PATCH}x{PATCH}, "
                f"not {down.shape[1]}."
            )
        down = down.reshape(down.shape[0], down.shape[1] // (PATCH * PATCH), PATCH, PATCH)
        up = up.reshape(up.shape[0], up.shape[1], 1, 1)
    if down.ndim == 4 and up.ndim == 4:
        if up.shape[2:] != (1, 1) or down.shape[0] != up.shape[1]:
            raise AdapterError(
                f"LoRA module {name!r}: conv down {tuple(down.shape)} and up {tuple(up.shape)} are not a "
                "rank-r pair (up must be [out, r, 1, 1])."
            )
        return down, up
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise AdapterError(
            f"LoRA module {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a rank-r pair "
            "of linear matrices ([r, in] and [out, r])."
        )
    return down, up


def _config_alpha(name: str, rank: int, config: dict[str, Any] | None) -> float:
    """alpha of a module from the peft LoraConfig (rank if none; alpha*sqrt(r) for use_rslora)."""
    if not config:
        return float(rank)
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise AdapterError("The LoRA metadata's alpha_pattern is not a mapping; re-export the adapter.")
    pattern = get_pattern_key(list(alpha_pattern), name) if alpha_pattern else None
    raw = (
        alpha_pattern.get(pattern, config.get("lora_alpha", rank))
        if pattern
        else config.get("lora_alpha", rank)
    )
    alpha = check_alpha(f"lora_alpha of {name}", raw)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # peft: scale = lora_alpha / sqrt(r) = (alpha*sqrt(r)) / r
    return alpha


def modules_from_state_dict(
    state_dict: dict[str, torch.Tensor], fmt: str, lora_config: dict[str, Any] | None
) -> Modules:
    """State dict in any layout -> diffusers-named transformer Modules (text encoders: parts_from_state_dict)."""
    return parts_from_state_dict(state_dict, {TRANSFORMER: lora_config} if lora_config else None).transformer


# --- writing -------------------------------------------------------------------------------------


def to_state_dict(
    modules: Modules, fmt: str, text_encoders: dict[str, Modules] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Diffusers-named Modules (+ text encoders) -> (state dict in `fmt`, extra safetensors header entries).

    diffusers: every module is written with alpha = rank, its scale folded into lora_B, so stock diffusers
    (with or without the header) and ComfyUI (which reads no alpha for these keys) both load it at the
    trained strength. Exact: bitwise for power-of-two scales, otherwise one float rounding of lora_B.
    """
    import torch

    text_encoders = {c: m for c, m in (text_encoders or {}).items() if m}
    if fmt == "diffusers":
        state_dict: dict[str, torch.Tensor] = {}
        configs: dict[str, Any] = {}
        for component, mods in [(TRANSFORMER, modules), *text_encoders.items()]:
            folded = {name: _fold(m) for name, m in mods.items()}
            for name, module in folded.items():
                stem = f"{component}.{name}"
                state_dict[f"{stem}.lora_A.weight"] = module.down.contiguous()
                state_dict[f"{stem}.lora_B.weight"] = module.up.contiguous()
                if module.bias is not None:
                    state_dict[f"{stem}.lora_B.bias"] = module.bias.to(module.up.dtype).contiguous()
            if folded or component == TRANSFORMER:
                configs.update(prefixed_config(lora_config_for(folded), component))
        return state_dict, {"lora_adapter_metadata": json.dumps(configs, indent=2, sort_keys=True)}
    if fmt not in ("kohya", "comfyui"):
        raise AdapterError(f"Unknown adapter format {fmt!r}; use one of {', '.join(FORMATS)}.")
    state_dict = {}
    named = [(f"{KOHYA_PREFIX}{n.replace('.', '_')}" if fmt == "kohya" else f"{COMFY_PREFIX}{n}", m)
             for n, m in to_mmdit(modules).items()]  # fmt: skip
    for component, mods in text_encoders.items():
        named += [(te_key(component, n, fmt), m) for n, m in mods.items()]
    for base, module in named:
        state_dict[f"{base}.lora_down.weight"] = module.down.contiguous()
        state_dict[f"{base}.lora_up.weight"] = module.up.contiguous()
        state_dict[f"{base}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
        if module.bias is not None:  # ComfyUI's bias delta (kohya has no bias LoRA)
            state_dict[f"{base}.diff_b"] = module.bias.to(module.up.dtype).contiguous()
    return state_dict, {}


def _fold(module: LoraModule) -> LoraModule:
    """The same LoRA with alpha = rank: scale folded into up (and the bias kept as the delta itself)."""
    if module.alpha == module.rank:
        return module
    up = (module.up.double() * module.scale).to(module.up.dtype)
    return LoraModule(down=module.down, up=up, alpha=float(module.rank), bias=module.bias)


def lora_config_for(modules: Modules) -> dict[str, Any]:
    """peft LoraConfig kwargs that make stock diffusers load these ranks and alphas exactly."""
    ranks = {name: m.rank for name, m in modules.items()}
    alphas = {name: m.alpha for name, m in modules.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else 1.0
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": any(m.bias is not None for m in modules.values()),
    }


def prefixed_config(config: dict[str, Any], component: str = TRANSFORMER) -> dict[str, Any]:
    return {f"{component}.{k}": v for k, v in config.items()}


def unprefixed_configs(header_value: str | None) -> dict[str, dict[str, Any]]:
    """{component: LoraConfig dict} out of diffusers' `lora_adapter_metadata` header value."""
    if not header_value:
        return {}
    raw = json.loads(header_value)
    if not isinstance(raw, dict):
        raise AdapterError("The lora_adapter_metadata header is not a JSON object; re-export the adapter.")
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        component, _, field_name = str(key).partition(".")
        if component in (TRANSFORMER, *TEXT_ENCODERS) and field_name:
            out.setdefault(component, {})[field_name] = value
    return out


def unprefixed_config(header_value: str | None) -> dict[str, Any] | None:
    """The transformer's LoraConfig dict out of diffusers' `lora_adapter_metadata` header value."""
    return unprefixed_configs(header_value).get(TRANSFORMER)


__all__ += ["ParsedKey", "unprefixed_configs"]
