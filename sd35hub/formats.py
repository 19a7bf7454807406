"""SD3 LoRA key layouts: detect diffusers/peft, kohya and ComfyUI state dicts and convert between them.

Pure state-dict work (torch tensors in, torch tensors out); no model is needed. The key mappings are
documented in docs/formats.md. In short, for transformer block N:

    diffusers/peft   transformer.transformer_blocks.N.attn.to_q.lora_A.weight        [r, in]
                     transformer.transformer_blocks.N.attn.to_q.lora_B.weight        [out, r]
                     (alpha lives in the safetensors header, `lora_adapter_metadata`)
    kohya sd-scripts lora_unet_joint_blocks_N_x_block_attn_qkv.lora_down.weight      [r, in]
                     lora_unet_joint_blocks_N_x_block_attn_qkv.lora_up.weight        [3*out, r]
                     lora_unet_joint_blocks_N_x_block_attn_qkv.alpha                 scalar
    ComfyUI          diffusion_model.joint_blocks.N.x_block.attn.qkv.lora_down.weight (same tensors)

kohya and ComfyUI use the original SD3 (MMDiT) module names, where q, k and v are ONE fused linear
(`attn.qkv`); diffusers splits them. Both directions are exact (see `fuse_qkv` / `split_qkv`).

The in-between representation is `Modules`: {diffusers module path: LoraModule(down, up, alpha)},
e.g. "transformer_blocks.0.attn.to_q". Every conversion goes through it.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from sd35hub.errors import AdapterError, AdapterIncompatibleError
from sd35hub.formats_mmdit import (
    GLOBAL_LINEAR,
    MMDIT_SUFFIXES,
    LoraModule,
    Modules,
    from_mmdit,
    fuse_qkv,
    split_qkv,
    to_mmdit,
)

__all__ = [
    "FORMATS", "LoraModule", "Modules", "detect_format", "foreign_architecture", "fuse_qkv", "split_qkv",
    "modules_from_state_dict", "to_state_dict", "lora_config_for", "to_mmdit", "from_mmdit",
]  # fmt: skip

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya", "comfyui")
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."


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
    ("down_blocks.0.attentions", "Stable Diffusion XL / 1.x (UNet)"),
    ("input_blocks.", "Stable Diffusion XL / 1.x (UNet)"),
)
_SD3_MARKERS = ("transformer_blocks", "joint_blocks", "context_embedder", "t_embedder", "time_text_embed")


def foreign_architecture(keys: list[str]) -> str | None:
    """The other architecture an adapter was made for ("FLUX.1", "Stable Diffusion XL / 1.x (UNet)"), or None."""
    for key in keys:
        for marker, arch in FOREIGN_MARKERS:
            if marker in key:
                return arch
    return None


def detect_format(state_dict: dict[str, Any]) -> str:
    """'diffusers', 'kohya' or 'comfyui' for an SD3 LoRA state dict; clear errors for anything else."""
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
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfyui"
    if any(".lora_A." in k or ".lora_B." in k for k in keys) and any(
        m in k for k in keys for m in _SD3_MARKERS
    ):
        return "diffusers"
    raise AdapterError(
        f"Unknown LoRA key layout (keys like {_example(keys)!r}). sd35hub reads diffusers/peft "
        "('transformer.transformer_blocks.0.attn.to_q.lora_A.weight'), kohya ('lora_unet_joint_blocks_0_...') "
        "and ComfyUI ('diffusion_model.joint_blocks.0...') SD3 LoRAs; LyCORIS/LoHa/LoKr are not supported."
    )


def _example(keys: list[str]) -> str:
    return sorted(keys)[0]


# --- reading -------------------------------------------------------------------------------------


def modules_from_diffusers(
    state_dict: dict[str, torch.Tensor], lora_config: dict[str, Any] | None
) -> Modules:
    """Diffusers/peft keys (with or without the 'transformer.' prefix) + peft LoraConfig dict -> Modules.

    Without a config, alpha = rank per module (what diffusers assumes).
    """
    from peft.utils.other import get_pattern_key

    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(DIFFUSERS_PREFIX).removeprefix("base_model.model.")
        if name.endswith(".lora_A.weight"):
            downs[name[: -len(".lora_A.weight")]] = tensor
        elif name.endswith(".lora_B.weight"):
            ups[name[: -len(".lora_B.weight")]] = tensor
        elif name.endswith(".lora_B.bias") or "lora_magnitude_vector" in name:
            raise AdapterError(
                f"{key!r}: LoRA biases and DoRA are not supported; retrain without lora_bias/use_dora."
            )
        elif key.startswith(("text_encoder.", "text_encoder_2.")):
            log.warning("Skipping text-encoder LoRA key %s (only transformer LoRAs are supported)", key)
        else:
            raise AdapterError(
                f"Unexpected key {key!r} in a diffusers LoRA: expected '*.lora_A.weight' / '*.lora_B.weight'."
            )
    _check_pairs(downs, ups)
    config = lora_config or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    modules: Modules = {}
    for name in sorted(downs):
        rank = int(downs[name].shape[0])
        if config:
            pattern = get_pattern_key(list(alpha_pattern), name)
            alpha = float(alpha_pattern.get(pattern, config.get("lora_alpha", rank)))
        else:
            alpha = float(rank)
        modules[name] = LoraModule(down=downs[name], up=ups[name], alpha=alpha)
    return modules


def _check_pairs(downs: dict[str, Any], ups: dict[str, Any]) -> None:
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise AdapterError(
            f"LoRA modules without both down and up matrices: {unpaired[:3]} - the file is incomplete."
        )
    for name in downs:
        if downs[name].ndim != 2 or ups[name].ndim != 2 or downs[name].shape[0] != ups[name].shape[1]:
            raise AdapterError(
                f"LoRA module {name!r}: down {tuple(downs[name].shape)} and up {tuple(ups[name].shape)} "
                "are not a rank-r pair of linear matrices (conv LoRAs are not supported on SD3)."
            )


def mmdit_from_foreign(state_dict: dict[str, torch.Tensor], fmt: str) -> Modules:
    """kohya / ComfyUI keys -> Modules keyed by MMDiT module name ('joint_blocks.0.x_block.attn.qkv')."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    skipped = 0
    for key, tensor in state_dict.items():
        stem, _, leaf = key.partition(".")
        if fmt == "kohya":
            if not stem.startswith(KOHYA_PREFIX):
                if stem.startswith("lora_te"):
                    skipped += 1
                    continue
                raise AdapterError(f"Unexpected key {key!r} in a kohya LoRA (expected 'lora_unet_*').")
            name = _kohya_to_mmdit(stem[len(KOHYA_PREFIX) :])
        else:
            if not key.startswith(COMFY_PREFIX):
                if key.startswith(("text_encoders.", "lora_te")):
                    skipped += 1
                    continue
                raise AdapterError(
                    f"Unexpected key {key!r} in a ComfyUI LoRA (expected 'diffusion_model.*')."
                )
            body = key[len(COMFY_PREFIX) :]
            for leaf in ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha"):
                if body.endswith("." + leaf):
                    name = body[: -len(leaf) - 1]
                    break
            else:
                raise AdapterError(f"Unexpected key {key!r} in a ComfyUI LoRA (LoHa/LoKr are not supported).")
        if leaf in ("lora_down.weight", "lora_A.weight"):
            downs[name] = tensor
        elif leaf in ("lora_up.weight", "lora_B.weight"):
            ups[name] = tensor
        elif leaf == "alpha":
            alphas[name] = float(tensor.item())
        elif leaf == "dora_scale" or leaf.startswith("hada_") or leaf.startswith("lokr_"):
            raise AdapterError(f"{key!r}: DoRA/LoHa/LoKr adapters are not supported; only plain LoRA.")
        else:
            raise AdapterError(f"Unexpected key {key!r} in a {fmt} LoRA.")
    if skipped:
        log.warning("Skipped %d text-encoder LoRA tensors (only the transformer part is used)", skipped)
    _check_pairs(downs, ups)
    return {
        name: LoraModule(down=downs[name], up=ups[name], alpha=alphas.get(name, float(downs[name].shape[0])))
        for name in sorted(downs)
    }


_KOHYA_BLOCK = re.compile(r"^joint_blocks_(\d+)_(.+)$")


def _kohya_to_mmdit(body: str) -> str:
    """'joint_blocks_0_x_block_attn_qkv' -> 'joint_blocks.0.x_block.attn.qkv' (underscores are ambiguous)."""
    match = _KOHYA_BLOCK.match(body)
    if match:
        for suffix in MMDIT_SUFFIXES:
            if suffix.replace(".", "_") == match.group(2):
                return f"joint_blocks.{match.group(1)}.{suffix}"
    for mmdit in GLOBAL_LINEAR.values():
        if mmdit.replace(".", "_") == body:
            return mmdit
    raise AdapterError(f"kohya LoRA module 'lora_unet_{body}' is not a known SD3 MMDiT linear layer.")


# --- writing -------------------------------------------------------------------------------------


def to_state_dict(modules: Modules, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Diffusers-named Modules -> (state dict in `fmt`, extra safetensors header entries)."""
    import torch

    if fmt == "diffusers":
        state_dict: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            state_dict[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = module.down.contiguous()
            state_dict[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = module.up.contiguous()
        config = lora_config_for(modules)
        return state_dict, {
            "lora_adapter_metadata": json.dumps(prefixed_config(config), indent=2, sort_keys=True)
        }
    if fmt not in ("kohya", "comfyui"):
        raise AdapterError(f"Unknown adapter format {fmt!r}; use one of {', '.join(FORMATS)}.")
    state_dict = {}
    for name, module in to_mmdit(modules).items():
        base = f"{KOHYA_PREFIX}{name.replace('.', '_')}" if fmt == "kohya" else f"{COMFY_PREFIX}{name}"
        state_dict[f"{base}.lora_down.weight"] = module.down.contiguous()
        state_dict[f"{base}.lora_up.weight"] = module.up.contiguous()
        state_dict[f"{base}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return state_dict, {}


def modules_from_state_dict(
    state_dict: dict[str, torch.Tensor], fmt: str, lora_config: dict[str, Any] | None
) -> Modules:
    """State dict in `fmt` -> diffusers-named Modules."""
    if fmt == "diffusers":
        return modules_from_diffusers(state_dict, lora_config)
    return from_mmdit(mmdit_from_foreign(state_dict, fmt))


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
        "lora_bias": False,
    }


def prefixed_config(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}


def unprefixed_config(header_value: str | None) -> dict[str, Any] | None:
    """The transformer's LoraConfig dict out of diffusers' `lora_adapter_metadata` header value."""
    if not header_value:
        return None
    raw = json.loads(header_value)
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items() if k.startswith(DIFFUSERS_PREFIX)}
    return config or None
