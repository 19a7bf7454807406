"""Shared helpers for the adapter/format/blend/merge tests: the tiny pipeline and random LoRAs on it.

LoRA B matrices are initialised with random non-zero values so that every adapter visibly changes
the output of the (random) tiny model.
"""

from __future__ import annotations

from typing import Any

import torch

# Every kind of linear layer the SD3 key mappings cover, including the (scale, shift)-swapped ones
# (norm_out.linear and the last block's norm1_context.linear) and the dual-attention attn2.
ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder",
    "timestep_embedder.linear_1", "text_embedder.linear_2",
]  # fmt: skip
ATTENTION_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


def tiny_pipe() -> Any:
    from sd35hub.models.load import load_pipeline

    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_random_lora(
    transformer: Any,
    name: str = "default",
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: list[str] | None = None,
    seed: int = 0,
    std: float = 0.2,
) -> None:
    """peft LoRA `name` on the transformer with random A and B (B non-zero, so the LoRA has an effect)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets or ATTENTION_TARGETS, init_lora_weights="gaussian"
    )
    transformer.add_adapter(config, adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in transformer.named_parameters():
            if f".lora_A.{name}." in param_name or f".lora_B.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def generate_latents(pipe: Any, *, seed: int = 0, prompt: str = "a red fox in the snow") -> torch.Tensor:
    """A short deterministic run of the pipeline: final latents [1, 16, 8, 8] for a 64 px image."""
    out = pipe(
        prompt=prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images
