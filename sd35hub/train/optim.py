"""Optimizer, LR schedule, EMA of the LoRA weights, and the optimizer step on its own.

``optimizer_step`` is the whole update after ``loss.backward()``; a benchmark can pair it with
:func:`sd35hub.train.flow.flow_loss` on a randomly-initialised full-size transformer without the trainer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import torch

from sd35hub.config import TrainSpec
from sd35hub.errors import MissingDependencyError


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: TrainSpec,
                    text_encoder_params: Iterable[torch.nn.Parameter] = (),
                    extra_groups: Iterable[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """adamw (fused on CUDA) | adamw8bit (bitsandbytes) | prodigy (prodigyopt; use learning_rate=1.0).
    ``text_encoder_params`` (those of ``params`` that belong to a text-encoder LoRA) form a second parameter
    group at ``train.text_encoder_lr`` (default learning_rate); the LR schedule scales both groups alike.
    ``extra_groups``: more parameter groups with their own settings (pivotal tuning's new-token rows)."""
    params = list(params)
    te_ids = {id(p) for p in text_encoder_params}
    groups: Any = params
    if te_ids:
        groups = [{"params": [p for p in params if id(p) not in te_ids]},
                  {"params": [p for p in params if id(p) in te_ids], "lr": spec.text_encoder_lr or spec.learning_rate}]
    extra = list(extra_groups)
    if extra:
        groups = (groups if te_ids else [{"params": params}]) + extra
    kwargs: dict[str, Any] = dict(lr=spec.learning_rate, betas=tuple(spec.adam_betas), weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError("bitsandbytes", "train.optimizer=adamw8bit", extra="quant")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if spec.optimizer == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise MissingDependencyError("prodigyopt", "train.optimizer=prodigy", extra="prodigy")
        from prodigyopt import Prodigy

        return Prodigy(groups, safeguard_warmup=spec.warmup_steps > 0, use_bias_correction=True, **kwargs)
    from sd35hub.train.speed import fused_adamw_kwargs

    return torch.optim.AdamW(groups, **kwargs, **fused_adamw_kwargs(params))


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec, total_steps: int) -> Any:
    """diffusers' get_scheduler, stepped once per optimizer step (not per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        spec.lr_scheduler, optimizer=optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=total_steps
    )


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    max_grad_norm: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor | None:
    """Clip, step, schedule, zero: one update after ``loss.backward()`` (or ``scaler.scale(loss).backward()``).

    Returns the gradient norm before clipping as a device tensor (None when clipping is off): reading
    it on the host would wait for the GPU, so callers do that only when they log. With fp16 a
    ``scaler`` unscales first and skips the step on inf/nan gradients.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class LoraEMA:
    """Exponential moving average of named LoRA parameters, kept in fp32 on the parameters' device.

    ``swap_in`` puts the averages into the model (for validation/saving); ``swap_out`` restores the
    trained weights. State is a name -> tensor dict, so checkpoints store it as safetensors.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.params = named_params
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}
        self._backup: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap_in(self) -> None:
        self._backup = {n: p.detach().clone() for n, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._backup is not None:
            for name, p in self.params.items():
                p.copy_(self._backup[name])
            self._backup = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.shadow[name] = tensor.to(self.shadow[name].device, torch.float32).clone()
