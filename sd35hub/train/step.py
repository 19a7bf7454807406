"""THE training step: one micro-batch's forward, backward, clip and update, under accelerate.

The trainer (``sd35hub.train.recipe.Trainer._step``) and the benchmark (``sd35hub bench``, "ours" rows)
both call :func:`optimize_micro_batch`, so the step the bench times is the step the trainer runs:

    loss = optimize_micro_batch(acc, transformer, params, optimizer,
                                lambda: flow_loss(transformer, latents, prompt_embeds, pooled, noise, sigmas),
                                attention="cudnn", max_grad_norm=1.0)

``acc`` is an ``accelerate.Accelerator`` whose ``prepare`` wrapped ``transformer`` (autocast for bf16/fp16,
DDP for several processes) and ``optimizer`` (skips the update on accumulation micro-batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sd35hub.train.speed import attention_backend


def optimize_micro_batch(
    acc: Any,
    transformer: Any,
    params: list[torch.nn.Parameter],
    optimizer: Any,
    compute_loss: Callable[[], torch.Tensor],
    *,
    attention: str = "auto",
    max_grad_norm: float = 1.0,
    unsynced: list[torch.nn.Parameter] | tuple[()] = (),
) -> torch.Tensor:
    """Forward (``compute_loss``), backward, clip (when gradients sync), optimizer step and zero.

    Returns the micro-batch loss detached, as a 0-d device tensor (reading it would wait for the GPU).
    ``attention``: the SDPA backend for forward and backward (cuDNN's fused attention is the fastest
    at SD3.5's ~4k tokens on Hopper; flash / efficient / math stay as fallbacks where it does not apply).
    ``unsynced``: trained tensors outside the prepared (DDP) model (the text-encoder LoRA): on several
    processes their gradients are averaged here when the step syncs, as DDP does for the transformer's.
    """
    with acc.accumulate(transformer), attention_backend(attention):
        loss = compute_loss()
        acc.backward(loss)
        if unsynced and acc.sync_gradients and acc.num_processes > 1:
            for p in unsynced:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
        if acc.sync_gradients and max_grad_norm > 0:
            acc.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
