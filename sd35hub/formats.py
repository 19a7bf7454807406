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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sd35hub.errors import AdapterError, AdapterIncompatibleError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya", "comfyui")
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."


@dataclass
class LoraModule:
    """One LoRA pair on one nn.Linear: delta_W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # lora_A / lora_down: [rank, in_features]
    up: torch.Tensor  # lora_B / lora_up: [out_features, rank]
    alpha: float  # scale = alpha / rank (diffusers without metadata: alpha = rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


Modules = dict[str, LoraModule]

# --- module names: diffusers (split q/k/v) <-> original SD3 MMDiT (fused qkv) -------------------
# Inside joint block N: diffusers suffix -> MMDiT suffix.
BLOCK_LINEAR = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # last block: (scale, shift) swapped
}
# MMDiT fused qkv -> the three diffusers projections, in row order q, k, v.
BLOCK_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
# Outside the blocks.
GLOBAL_LINEAR = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) swapped
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_JOINT = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")
_MMDIT_SUFFIXES = list(BLOCK_LINEAR.values()) + list(BLOCK_QKV)
_KOHYA_BLOCK = re.compile(r"^joint_blocks_(\d+)_(.+)$")

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
        raise AdapterError("The adapter file holds no tensors. Re-export it, or check you picked the right file.")
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
    if any(".lora_A." in k or ".lora_B." in k for k in keys) and any(m in k for k in keys for m in _SD3_MARKERS):
        return "diffusers"
    raise AdapterError(
        f"Unknown LoRA key layout (keys like {_example(keys)!r}). sd35hub reads diffusers/peft "
        "('transformer.transformer_blocks.0.attn.to_q.lora_A.weight'), kohya ('lora_unet_joint_blocks_0_...') "
        "and ComfyUI ('diffusion_model.joint_blocks.0...') SD3 LoRAs; LyCORIS/LoHa/LoKr are not supported."
    )


def _example(keys: list[str]) -> str:
    return sorted(keys)[0]


# --- reading -------------------------------------------------------------------------------------


def modules_from_diffusers(state_dict: dict[str, torch.Tensor], lora_config: dict[str, Any] | None) -> Modules:
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
            raise AdapterError(f"{key!r}: LoRA biases and DoRA are not supported; retrain without lora_bias/use_dora.")
        elif key.startswith(("text_encoder.", "text_encoder_2.")):
            log.warning("Skipping text-encoder LoRA key %s (only transformer LoRAs are supported)", key)
        else:
            raise AdapterError(f"Unexpected key {key!r} in a diffusers LoRA: expected '*.lora_A.weight' / '*.lora_B.weight'.")
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
        raise AdapterError(f"LoRA modules without both down and up matrices: {unpaired[:3]} - the file is incomplete.")
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
                raise AdapterError(f"Unexpected key {key!r} in a ComfyUI LoRA (expected 'diffusion_model.*').")
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


def _kohya_to_mmdit(body: str) -> str:
    """'joint_blocks_0_x_block_attn_qkv' -> 'joint_blocks.0.x_block.attn.qkv' (underscores are ambiguous)."""
    match = _KOHYA_BLOCK.match(body)
    if match:
        for suffix in _MMDIT_SUFFIXES:
            if suffix.replace(".", "_") == match.group(2):
                return f"joint_blocks.{match.group(1)}.{suffix}"
    for mmdit in GLOBAL_LINEAR.values():
        if mmdit.replace(".", "_") == body:
            return mmdit
    raise AdapterError(f"kohya LoRA module 'lora_unet_{body}' is not a known SD3 MMDiT linear layer.")


# --- diffusers <-> MMDiT module names, fused qkv ---------------------------------------------------


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """Swap the two output halves: SD3's AdaLayerNormContinuous is (shift, scale), diffusers' (scale, shift)."""
    import torch

    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _needs_swap(diffusers_name: str, module: LoraModule) -> bool:
    if diffusers_name == "norm_out.linear":
        return True
    # The last joint block is "context pre-only": its norm1_context is AdaLayerNormContinuous
    # ([2 * dim] out, from a [dim] conditioning) instead of AdaLayerNormZero ([6 * dim] out).
    return diffusers_name.endswith("norm1_context.linear") and module.up.shape[0] == 2 * module.down.shape[1]


def to_mmdit(modules: Modules) -> Modules:
    """Diffusers-named Modules -> MMDiT-named Modules, fusing q/k/v into qkv."""
    out: Modules = {}
    used: set[str] = set()
    blocks = sorted({int(m.group(1)) for name in modules if (m := _BLOCK.match(name))})
    for index in blocks:
        for fused, parts in BLOCK_QKV.items():
            members = [modules.get(f"transformer_blocks.{index}.{p}") for p in parts]
            if any(m is not None for m in members):
                out[f"joint_blocks.{index}.{fused}"] = fuse_qkv(members)
                used.update(f"transformer_blocks.{index}.{p}" for p in parts)
    for name, module in modules.items():
        if name in used:
            continue
        block = _BLOCK.match(name)
        if block and block.group(2) in BLOCK_LINEAR:
            target = f"joint_blocks.{block.group(1)}.{BLOCK_LINEAR[block.group(2)]}"
        elif name in GLOBAL_LINEAR:
            target = GLOBAL_LINEAR[name]
        else:
            raise AdapterError(
                f"LoRA module {name!r} has no counterpart in the original SD3 layout (kohya/ComfyUI); "
                "keep this adapter in diffusers format."
            )
        up = _swap_halves(module.up) if _needs_swap(name, module) else module.up
        out[target] = LoraModule(down=module.down, up=up, alpha=module.alpha)
    return out


def from_mmdit(modules: Modules) -> Modules:
    """MMDiT-named Modules -> diffusers-named Modules, splitting qkv into q/k/v."""
    out: Modules = {}
    reverse_global = {v: k for k, v in GLOBAL_LINEAR.items()}
    reverse_block = {v: k for k, v in BLOCK_LINEAR.items()}
    for name, module in modules.items():
        joint = _JOINT.match(name)
        if joint and joint.group(2) in BLOCK_QKV:
            parts = BLOCK_QKV[joint.group(2)]
            for part, member in zip(parts, split_qkv(module), strict=True):
                if member is not None:
                    out[f"transformer_blocks.{joint.group(1)}.{part}"] = member
            continue
        if joint and joint.group(2) in reverse_block:
            target = f"transformer_blocks.{joint.group(1)}.{reverse_block[joint.group(2)]}"
        elif name in reverse_global:
            target = reverse_global[name]
        else:
            raise AdapterError(f"LoRA module {name!r} is not a known SD3 MMDiT linear layer.")
        swapped = LoraModule(down=module.down, up=module.up, alpha=module.alpha)
        if _needs_swap(target, swapped):
            swapped.up = _swap_halves(module.up)
        out[target] = swapped
    return dict(sorted(out.items()))


def fuse_qkv(members: list[LoraModule | None]) -> LoraModule:
    """Three LoRAs on q, k, v (any may be None) -> one exact LoRA on the fused qkv linear.

    * Shared down (all three present, same alpha, bitwise-equal lora_A): down = A, up = cat(B_q, B_k, B_v);
      rank r stays r.
    * Otherwise block-diagonal: down = cat(A_q, A_k, A_v) [3r, in], up = blockdiag(B_q, B_k, B_v) [3*out, 3r];
      qkv @ x = (B_i A_i x) per row-chunk, so it is exact. A missing member is an all-zero block of the
      same rank (dropped again by split_qkv). Equal scales keep alpha' = alpha * 3r / r; unequal scales
      are folded into the up matrices (alpha' = rank', scale 1): exact in value, not bitwise.
    """
    import torch

    present = [m for m in members if m is not None]
    first = present[0]
    if len(present) == 3 and all(m.alpha == first.alpha and torch.equal(m.down, first.down) for m in present):
        return LoraModule(down=first.down, up=torch.cat([m.up for m in present], dim=0), alpha=first.alpha)
    # A missing member becomes an all-zero block of the first member's rank (split_qkv drops it again).
    filled = [m if m is not None else _zero_like(first) for m in members]
    if len({m.rank for m in filled}) == 1 and all(m.alpha == first.alpha for m in filled):
        fused = _fuse_block_diagonal(filled)
        fused.alpha = first.alpha * fused.rank / first.rank  # same scale alpha/r as each member
        return fused
    # Unequal ranks or scales: fold each scale into its up matrix and use scale 1 (exact in value).
    fused = _fuse_block_diagonal([_folded(m) for m in filled])
    fused.alpha = float(fused.rank)
    return fused


def _zero_like(module: LoraModule) -> LoraModule:
    import torch

    return LoraModule(down=torch.zeros_like(module.down), up=torch.zeros_like(module.up), alpha=module.alpha)


def _folded(module: LoraModule) -> LoraModule:
    return LoraModule(down=module.down, up=module.up * module.scale, alpha=float(module.rank))


def _fuse_block_diagonal(members: list[LoraModule]) -> LoraModule:
    import torch

    down = torch.cat([m.down for m in members], dim=0)  # [r_q + r_k + r_v, in]
    up = torch.block_diag(*[m.up for m in members])  # [3 * out, r_q + r_k + r_v]
    return LoraModule(down=down, up=up, alpha=0.0)


def split_qkv(module: LoraModule) -> list[LoraModule | None]:
    """One LoRA on fused qkv -> q, k, v LoRAs (None for an all-zero member). Exact in both cases:

    * block-diagonal (rank divisible by 3 and every off-diagonal block exactly zero): ranks r/3 each;
    * otherwise the down matrix is shared: q = (A, B[0:out]), k = (A, B[out:2out]), v = (A, B[2out:]).
      Each gets its own copy of A (safetensors refuses shared storage).
    """
    rank = module.rank
    ups = module.up.chunk(3, dim=0)
    if rank % 3 == 0:
        third = rank // 3
        blocks = [(ups[i], module.down[i * third : (i + 1) * third]) for i in range(3)]
        off_diagonal_zero = all(
            not ups[i][:, : i * third].any() and not ups[i][:, (i + 1) * third :].any() for i in range(3)
        )
        if off_diagonal_zero:
            alpha = module.alpha * third / rank
            out: list[LoraModule | None] = []
            for i, (up, down) in enumerate(blocks):
                up_block = up[:, i * third : (i + 1) * third].contiguous()
                if not up_block.any() and not down.any():
                    out.append(None)
                else:
                    out.append(LoraModule(down=down.contiguous(), up=up_block, alpha=alpha))
            return out
    return [LoraModule(down=module.down.clone(), up=up.contiguous(), alpha=module.alpha) for up in ups]


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
        return state_dict, {"lora_adapter_metadata": json.dumps(_prefixed(config), indent=2, sort_keys=True)}
    if fmt not in ("kohya", "comfyui"):
        raise AdapterError(f"Unknown adapter format {fmt!r}; use one of {', '.join(FORMATS)}.")
    state_dict = {}
    for name, module in to_mmdit(modules).items():
        base = f"{KOHYA_PREFIX}{name.replace('.', '_')}" if fmt == "kohya" else f"{COMFY_PREFIX}{name}"
        state_dict[f"{base}.lora_down.weight"] = module.down.contiguous()
        state_dict[f"{base}.lora_up.weight"] = module.up.contiguous()
        state_dict[f"{base}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return state_dict, {}


def modules_from_state_dict(state_dict: dict[str, torch.Tensor], fmt: str, lora_config: dict[str, Any] | None) -> Modules:
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


def _prefixed(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}


def unprefixed_config(header_value: str | None) -> dict[str, Any] | None:
    """The transformer's LoraConfig dict out of diffusers' `lora_adapter_metadata` header value."""
    if not header_value:
        return None
    raw = json.loads(header_value)
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items() if k.startswith(DIFFUSERS_PREFIX)}
    return config or None
