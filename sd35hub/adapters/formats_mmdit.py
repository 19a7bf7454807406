"""Original SD3 (MMDiT) module names <-> diffusers module names, and exact fused-qkv LoRA algebra.

kohya sd-scripts and ComfyUI name SD3 layers as in Stability's reference code (`joint_blocks.N.
x_block.attn.qkv`, one fused q/k/v linear); diffusers splits q, k and v (`transformer_blocks.N.attn.
to_q`). `to_mmdit` / `from_mmdit` rename a whole adapter, fusing or splitting qkv exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sd35hub.errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class LoraModule:
    """One LoRA pair on one layer: delta_W = (alpha / rank) * up @ down, delta_b = bias.

    Linear: down [rank, in], up [out, rank]. Conv2d (only `pos_embed.proj`, the patch embedding):
    down [rank, in, k, k], up [out, rank, 1, 1] - peft's conv LoRA. `bias` is an optional bias delta
    [out] (ComfyUI `.diff_b`, peft `lora_B.bias`), stored as the delta itself (already scaled).
    """

    down: torch.Tensor  # lora_A / lora_down
    up: torch.Tensor  # lora_B / lora_up
    alpha: float  # scale = alpha / rank (diffusers without metadata: alpha = rank)
    bias: torch.Tensor | None = None  # delta of the layer's bias [out], added as is

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

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
    "pos_embed.proj": "x_embedder.proj",  # Conv2d patch embedding (kohya emb_dims, ComfyUI LoraSave)
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_JOINT = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")
MMDIT_SUFFIXES = list(BLOCK_LINEAR.values()) + list(BLOCK_QKV)


# --- diffusers <-> MMDiT module names, fused qkv ---------------------------------------------------


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """Swap the two output halves: SD3's AdaLayerNormContinuous is (shift, scale), diffusers' (scale, shift)."""
    import torch

    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _swapped(module: LoraModule) -> LoraModule:
    bias = _swap_halves(module.bias) if module.bias is not None else None
    return LoraModule(down=module.down, up=_swap_halves(module.up), alpha=module.alpha, bias=bias)


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
        out[target] = _swapped(module) if _needs_swap(name, module) else module
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
        out[target] = _swapped(module) if _needs_swap(target, module) else module
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
    bias = _fused_bias(members)
    if len(present) == 3 and all(m.alpha == first.alpha and torch.equal(m.down, first.down) for m in present):
        up = torch.cat([m.up for m in present], dim=0)
        return LoraModule(down=first.down, up=up, alpha=first.alpha, bias=bias)
    # A missing member becomes an all-zero block of the first member's rank (split_qkv drops it again).
    filled = [m if m is not None else _zero_like(first) for m in members]
    if len({m.rank for m in filled}) == 1 and all(m.alpha == first.alpha for m in filled):
        fused = _fuse_block_diagonal(filled)
        fused.alpha = first.alpha * fused.rank / first.rank  # same scale alpha/r as each member
        fused.bias = bias
        return fused
    # Unequal ranks or scales: fold each scale into its up matrix and use scale 1 (exact in value).
    fused = _fuse_block_diagonal([_folded(m) for m in filled])
    fused.alpha = float(fused.rank)
    fused.bias = bias
    return fused


def _fused_bias(members: list[LoraModule | None]) -> torch.Tensor | None:
    """Bias deltas of q, k, v stacked (zeros for a member without one), or None if none has one."""
    import torch

    if all(m is None or m.bias is None for m in members):
        return None
    present = next(m for m in members if m is not None)
    out = present.up.shape[0]
    dtype = next(m.bias for m in members if m is not None and m.bias is not None).dtype
    return torch.cat([m.bias if m is not None and m.bias is not None else torch.zeros(out, dtype=dtype)
                      for m in members])  # fmt: skip


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
    biases = list(module.bias.chunk(3)) if module.bias is not None else [None, None, None]
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
                bias = _bias_part(biases[i])
                if not up_block.any() and not down.any() and bias is None:
                    out.append(None)
                else:
                    out.append(LoraModule(down=down.contiguous(), up=up_block, alpha=alpha, bias=bias))
            return out
    return [
        LoraModule(down=module.down.clone(), up=up.contiguous(), alpha=module.alpha, bias=_bias_part(bias))
        for up, bias in zip(ups, biases, strict=True)
    ]


def _bias_part(bias: torch.Tensor | None) -> torch.Tensor | None:
    """One member's bias delta; an all-zero part (fusion filler) is dropped again."""
    return bias.contiguous() if bias is not None and bias.any() else None


def kohya_training_note(modules: Modules) -> str:
    """How kohya's `create_network(dim=r)` can take this adapter back for training (`--network_weights`).

    kohya fuses q/k/v into one qkv LoRA of rank r (split_qkv=False) or three rank-r members saved fused
    block-diagonally (split_qkv=True). Separate diffusers q/k/v LoRAs are written block-diagonally (rank 3r),
    which only a split_qkv=True network of dim r loads.
    """
    import collections

    ranks = collections.Counter(m.rank for m in modules.values())
    alphas = collections.Counter(m.alpha for m in modules.values())
    if not ranks:
        return ""
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    kinds = set()
    for name, fused in to_mmdit(modules).items():
        if _JOINT.match(name) and name.endswith(".qkv"):
            kinds.add("split" if fused.rank != rank else "shared")
    problems = []
    if len(ranks) > 1 or len(alphas) > 1:
        problems.append("its ranks or alphas differ between modules (one --network_dim/--network_alpha)")
    if len(kinds) > 1:
        problems.append("some q/k/v share their down matrix and some do not")
    if problems:
        return "kohya cannot continue training this file as one network: " + "; ".join(problems) + "."
    split = "True" if kinds == {"split"} else "False"
    return (
        f"To continue training it in kohya sd-scripts: --network_weights <file> --network_dim {rank} "
        f"--network_alpha {alpha:g} --network_args split_qkv={split}"
    )
