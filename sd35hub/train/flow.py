"""The rectified-flow objective SD3 / SD3.5 were trained with (Esser et al. 2024, "Scaling Rectified
Flow Transformers"), as pure functions so a benchmark can call the step without the trainer.

    sigma ~ p(sigma)                       timestep sampling: logit_normal | mode | cosmap | uniform
    sigma <- shift*sigma / (1 + (shift-1)*sigma)            timestep shift (SD3.5 ships shift 3.0)
    noisy  = (1 - sigma) * x0 + sigma * noise               x0: VAE latents [b, 16, h/8, w/8]
    target = noise - x0                                      the velocity the transformer predicts
    loss   = mean_b( w(sigma) * mean((pred - target)^2) )    w: none | sigma_sqrt | cosmap

With ``precondition=True`` the prediction is turned into an x0 estimate (``noisy - sigma * pred``)
and regressed on x0 instead (diffusers' ``precondition_outputs``). The transformer is given
``timestep = sigma * 1000`` (the scale FlowMatchEulerDiscreteScheduler uses at inference).
"""

from __future__ import annotations

import math
from typing import Any

import torch

SIGMA_MIN = 1e-5  # keeps sigma_sqrt weighting (sigma^-2) finite at the edge of (0, 1]
TIMESTEP_SCALE = 1000.0  # SD3 transformers embed t in [0, 1000]


def sample_sigmas(
    scheme: str,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Un-shifted sigmas [batch_size] in (0, 1], float32, drawn from ``generator``.

    logit_normal: sigmoid(N(logit_mean, logit_std)); mode: u ~ U(0,1), 1 - u - s*(cos²(πu/2) - 1 + u);
    cosmap: 1 - 1/(tan(πu/2) + 1); uniform: U(0, 1).
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if scheme == "cosmap":
        u = torch.rand(batch_size, generator=generator, device=device)
        sigmas = 1.0 - 1.0 / (torch.tan(math.pi * u / 2.0) + 1.0)
    elif scheme in ("logit_normal", "mode", "uniform"):
        sigmas = compute_density_for_timestep_sampling(
            scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
            device=device, generator=generator,
        )  # fmt: skip
    else:
        raise ValueError(f"timestep sampling {scheme!r} is not one of logit_normal, mode, cosmap, uniform")
    return sigmas.float().clamp(SIGMA_MIN, 1.0)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift*sigma / (1 + (shift-1)*sigma): shift > 1 spends more steps at high noise."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight [b]: none = 1, sigma_sqrt = sigma^-2, cosmap = 2 / (π(1 - 2σ + 2σ²))."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if scheme not in ("none", "sigma_sqrt", "cosmap"):
        raise ValueError(f"loss weighting {scheme!r} is not one of none, sigma_sqrt, cosmap")
    return compute_loss_weighting_for_sd3(scheme, sigmas.float()).float()


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * x0 + sigma * noise, computed in fp32 and returned in latents' dtype."""
    s = sigmas.float().view(-1, *([1] * (latents.dim() - 1)))
    return ((1.0 - s) * latents.float() + s * noise.float()).to(latents.dtype)


def flow_loss(
    transformer: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting: str = "none",
    precondition: bool = False,
    reduction: str = "mean",
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rectified-flow loss of one batch (fp32 scalar, or [b] with reduction="none").

    ``pixel_weights`` [b, 1, h/8, w/8] (masked loss, sd35hub.data.masks): each sample's loss becomes the
    weighted mean sum(w·err²) / sum(w) over its latent pixels, so a weight-0 pixel contributes nothing.

    latents: x0 [b, 16, h/8, w/8] (already shifted and scaled VAE latents, in the transformer's
    compute dtype); prompt_embeds [b, tokens, joint_attention_dim]; pooled_prompt_embeds
    [b, pooled_projection_dim]; noise like latents; sigmas [b] in (0, 1] (already shifted).
    """
    noisy = noisy_latents(latents, noise, sigmas)
    pred = transformer(
        hidden_states=noisy,
        timestep=sigmas.to(latents.device) * TIMESTEP_SCALE,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds,
        return_dict=False,
    )[0].float()
    s = sigmas.float().view(-1, *([1] * (latents.dim() - 1)))
    if precondition:
        pred = pred * (-s) + noisy.float()  # x0 estimate
        target = latents.float()
    else:
        target = noise.float() - latents.float()
    if pixel_weights is None:
        per_sample = ((pred - target) ** 2).reshape(latents.shape[0], -1).mean(dim=1)
    else:
        w = pixel_weights.float().to(pred.device).expand_as(pred)
        err = ((pred - target) ** 2 * w).reshape(latents.shape[0], -1).sum(dim=1)
        per_sample = err / w.reshape(latents.shape[0], -1).sum(dim=1).clamp_min(1e-8)
    per_sample = per_sample * loss_weights(weighting, sigmas).to(per_sample.device)
    return per_sample if reduction == "none" else per_sample.mean()


def draw_noise_and_sigmas(
    latents_shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    scheme: str = "logit_normal",
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [shape] float32, shifted sigmas [b]) from one CPU generator: the same on every device."""
    noise = torch.randn(latents_shape, generator=generator)
    sigmas = sample_sigmas(
        scheme, latents_shape[0], generator=generator, logit_mean=logit_mean, logit_std=logit_std,
        mode_scale=mode_scale,
    )  # fmt: skip
    return noise, shift_sigmas(sigmas, shift)
