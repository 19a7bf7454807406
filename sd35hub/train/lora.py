"""Attach a peft LoRA to an SD3Transformer2DModel: target presets, block selection, fp32 adapter weights.

Targets are resolved to *full module paths* (``transformer_blocks.3.attn.to_q``) from the modules the
model really has, so a block selection is exact and a preset never silently targets nothing:

    attention     the 8 joint-attention projections of every selected block —
                  image stream attn.to_q / to_k / to_v / to_out.0, text stream attn.add_q_proj /
                  add_k_proj / add_v_proj / to_add_out — plus attn2.* on Medium's dual-attention blocks
                  (the last block has no to_add_out: its text stream ends there)
    attention+ff  + the MLPs: ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2
    all-linear    every nn.Linear inside the selected blocks (incl. the adaLN norm1*.linear)
    a,b,c         explicit names, matched as suffixes inside the blocks ("to_q", "attn.to_q", "ff.net.2")
"""

from __future__ import annotations

import re
from typing import Any

import torch

from sd35hub.config import LoraSpec
from sd35hub.errors import ConfigError

ATTENTION_SUFFIXES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)  # fmt: skip
FF_SUFFIXES = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
PRESETS: dict[str, tuple[str, ...] | None] = {
    "attention": ATTENTION_SUFFIXES,
    "attention+ff": ATTENTION_SUFFIXES + FF_SUFFIXES,
    "all-linear": None,  # every Linear in the selected blocks
}
INIT_WEIGHTS: dict[str, Any] = {"gaussian": "gaussian", "default": True, "pissa": "pissa", "olora": "olora"}
# parameter-name markers of every adapter kind we train (LoRA/DoRA, LoKr, LoHa)
ADAPTER_MARKERS = ("lora_", "lokr_", "hada_")


def is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def block_linears(transformer: Any) -> list[tuple[int, str, str]]:
    """(block index, path inside the block, full path) of every nn.Linear in transformer_blocks."""
    out = []
    for name, module in transformer.named_modules():
        match = _BLOCK.match(name)
        if match and isinstance(module, torch.nn.Linear):
            out.append((int(match.group(1)), match.group(2), name))
    return out


def target_modules(transformer: Any, spec: LoraSpec) -> list[str]:
    """Full module paths the LoRA goes on, in model order; ConfigError when the choice matches nothing."""
    num_blocks = len(transformer.transformer_blocks)
    blocks = set(spec.block_indices(num_blocks))
    preset = spec.targets.strip()
    if preset in PRESETS:
        suffixes = PRESETS[preset]
    else:
        suffixes = tuple(t.strip() for t in preset.split(",") if t.strip())
    linears = [(i, inner, full) for i, inner, full in block_linears(transformer) if i in blocks]
    if suffixes is None:
        chosen = [full for _, _, full in linears]
    else:
        chosen = [full for _, inner, full in linears if any(inner == s or inner.endswith("." + s) for s in suffixes)]
        unmatched = [s for s in suffixes if not any(inner == s or inner.endswith("." + s) for _, inner, _ in linears)]
        if preset not in PRESETS and unmatched:
            known = sorted({inner for _, inner, _ in linears})
            raise ConfigError(
                f"lora.targets names {unmatched} which match no Linear layer in the selected blocks; "
                f"valid names include: {', '.join(known)}"
            )
    if not chosen:
        raise ConfigError(f"lora.targets={spec.targets!r} with lora.blocks={spec.blocks!r} selects no layer")
    return chosen


def lora_config(transformer: Any, spec: LoraSpec) -> Any:
    """The peft config for ``spec`` on this transformer (alpha None = rank, i.e. scale 1.0): a LoraConfig
    (variant lora / dora, with use_rslora), or LoKrConfig / LoHaConfig (sd35hub.train.variants)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if spec.init not in INIT_WEIGHTS:
        raise ConfigError(f"lora.init={spec.init!r} is not one of {', '.join(INIT_WEIGHTS)}")
    alpha = spec.alpha if spec.alpha is not None else spec.rank
    targets = target_modules(transformer, spec)
    if spec.variant == "lokr":
        return LoKrConfig(r=spec.rank, alpha=alpha, target_modules=targets, decompose_factor=spec.decompose_factor)
    if spec.variant == "loha":
        return LoHaConfig(r=spec.rank, alpha=alpha, target_modules=targets)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=alpha,
        lora_dropout=spec.dropout,
        init_lora_weights=INIT_WEIGHTS[spec.init],
        target_modules=targets,
        use_dora=spec.variant == "dora",
        use_rslora=spec.rslora,
    )


def attach_lora(transformer: Any, spec: LoraSpec, *, fp32_params: bool = True) -> list[torch.nn.Parameter]:
    """Freeze the base, add the LoRA (adapter "default"), return its trainable parameters.

    fp32_params keeps the adapter weights in float32 even when the base is bf16/fp16: the optimizer
    then updates full-precision weights (fp16 gradients need a grad scaler; see the recipe).
    """
    transformer.requires_grad_(False)
    if spec.init in ("pissa", "olora") and getattr(transformer, "hf_quantizer", None) is not None:
        raise ConfigError(f"lora.init={spec.init} rewrites the frozen base weights, which are quantized here "
                          "(model.quantize / the hardware profile); use lora.init=gaussian or model.quantize=none")
    transformer.add_adapter(lora_config(transformer, spec))
    params = [p for n, p in transformer.named_parameters() if p.requires_grad and is_adapter_param(n)]
    if fp32_params:
        for p in params:
            p.data = p.data.float()
    return params


def lora_state(transformer: Any) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by parameter name (detached CPU fp32 copies)."""
    return {n: p.detach().float().cpu().clone() for n, p in transformer.named_parameters() if is_adapter_param(n)}


def load_lora_state(transformer: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors from :func:`lora_state` back into the adapter (exact, dtype of the parameter).

    ConfigError, before anything is copied, unless ``state`` has exactly the adapter's tensors with
    the same shapes (a changed lora.rank / lora.blocks / lora.targets would otherwise fail mid-copy).
    """
    expected = {n: p for n, p in transformer.named_parameters() if is_adapter_param(n)}
    fix = ("resume with the same lora.* and model settings the checkpoint was written with, "
           "or start a new run in a new output dir (train.output_dir) without train.resume")
    if set(state) != set(expected):
        extra = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        first = f"checkpoint has {extra[0]} which this LoRA lacks" if extra else f"checkpoint lacks {missing[0]}"
        raise ConfigError(
            f"the checkpoint's LoRA does not fit this model/LoRA config ({first}; {len(extra)} extra, "
            f"{len(missing)} missing tensors); {fix}"
        )
    for name in sorted(state):  # sorted: the first bad key named is the same every time
        tensor = state[name]
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"the checkpoint's LoRA does not fit this LoRA config: {name} has shape {tuple(tensor.shape)} in "
                f"the checkpoint but {tuple(expected[name].shape)} here (lora.rank changed?); {fix}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor.to(expected[name].dtype))
