"""Validation during training: image grids with fixed prompts and seeds, and a held-out loss.

Prompts are encoded once, *before* the text encoders leave the GPU, and the embeddings are reused
at every validation (the encoders are never needed again). Each grid has one row per prompt and two
columns: the base model (rendered once, adapter disabled) and the LoRA at this step, same seed.

The validation loss uses samples that never train (``data.holdout``; automatic: none below 50
samples) or, with nothing held out, a few training samples; always one fixed VAE latent sample,
fixed noise and a fixed spread of sigmas, so its changes come from the adapter alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from sd35hub.paths import atomic_write
from sd35hub.train.flow import flow_loss

HELDOUT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # every held-out sample is scored at each of these


@dataclass
class EncodedPrompts:
    prompts: list[str]
    embeds: dict[str, torch.Tensor]  # pipeline kwargs: prompt_embeds, pooled_prompt_embeds (+ negative_*), CPU


def encode_prompts(pipe: Any, prompts: list[str], *, guidance: float, max_sequence_length: int,
                   device: str | torch.device) -> EncodedPrompts:
    """Run the pipeline's text encoders once for the validation prompts (and the empty negative)."""
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device,
            do_classifier_free_guidance=guidance > 1.0, max_sequence_length=max_sequence_length,
        )  # fmt: skip
    embeds = {"prompt_embeds": pe.cpu(), "pooled_prompt_embeds": pooled.cpu()}
    if npe is not None:
        embeds.update(negative_prompt_embeds=npe.cpu(), negative_pooled_prompt_embeds=npooled.cpu())
    return EncodedPrompts(list(prompts), embeds)


def render(pipe: Any, encoded: EncodedPrompts, *, size: int, steps: int, guidance: float, seed: int,
           device: str | torch.device, dtype: torch.dtype, pipe_kwargs: dict[str, Any] | None = None) -> list[Image.Image]:
    """One image per prompt (seed + row index), with whatever adapter state the transformer has.
    ``pipe_kwargs``: more pipeline arguments (skip-layer guidance: sd35hub.models.presets)."""
    images = []
    for row in range(len(encoded.prompts)):
        kwargs = {k: v[row : row + 1].to(device, dtype) for k, v in encoded.embeds.items()}
        generator = torch.Generator("cpu").manual_seed(seed + row)
        with torch.no_grad():
            images.append(pipe(
                **kwargs, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                generator=generator, **(pipe_kwargs or {}),
            ).images[0])  # fmt: skip
    return images


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font: real spaces
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` on one line, cut with an ellipsis to fit ``width`` pixels."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[: max(len(text) - max(len(text) // 8, 1), 0)]
    return text + "…"


def grid(columns: list[tuple[str, list[Image.Image]]], rows: list[str] | None = None) -> Image.Image:
    """Columns of equally-sized images side by side: a header with each column's label, and above
    each row a strip with its label (the prompt, cut to the grid's width)."""
    width, height = columns[0][1][0].size
    count = len(columns[0][1])
    rows = list(rows) if rows is not None else [f"row {r + 1}" for r in range(count)]
    font = _font(12)
    strip = 16
    total_w = width * len(columns)
    canvas = Image.new("RGB", (total_w, strip + count * (strip + height)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (label, _) in enumerate(columns):
        draw.text((c * width + 3, 1), _fit(draw, label, font, width - 6), fill=(0, 0, 0), font=font)
    for r in range(count):
        top = strip + r * (strip + height)
        draw.rectangle((0, top, total_w, top + strip - 1), fill=(235, 235, 235))
        draw.text((3, top + 1), _fit(draw, f"{r + 1}. {rows[r]}", font, total_w - 6), fill=(0, 0, 0), font=font)
        for c, (_, images) in enumerate(columns):
            canvas.paste(images[r], (c * width, top + strip))
    return canvas


def image_params(*, base_model: str, prompts: list[str], size: int, steps: int, guidance: float, seed: int,
                 step: int | None = None, columns: list[str] | None = None) -> dict[str, Any]:
    """The PNG text chunks of a validation image or grid (sd35hub.pngmeta): row i used seed + i."""
    from sd35hub import __version__

    params: dict[str, Any] = {
        "prompt": prompts[0] if len(prompts) == 1 else " | ".join(prompts), "prompts": list(prompts),
        "seed": seed, "seeds": [seed + i for i in range(len(prompts))], "steps": steps, "guidance_scale": guidance,
        "width": size, "height": size, "model": base_model, "sd35hub_version": __version__,
    }  # fmt: skip
    if step is not None:
        params["training_step"] = step
    if columns is not None:
        params["columns"] = list(columns)
    return params


def save_png(image: Image.Image, path: Path, params: dict[str, Any] | None = None) -> Path:
    """Write ``image`` atomically; with ``params``, with them in PNG text chunks (sd35hub.pngmeta)."""
    if params is not None:
        from sd35hub.pngmeta import save_png as save_with_params

        return save_with_params(image, path, params)
    return atomic_write(path, lambda temp: image.save(temp, format="PNG"))


@dataclass
class HeldOut:
    """Fixed inputs of the held-out loss: every sample repeated at each sigma of HELDOUT_SIGMAS."""

    latents: torch.Tensor  # [n*k, 16, h/8, w/8]
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor  # [n*k]
    keys: list[str]
    weights: torch.Tensor | None = None  # [n*k, 1, h/8, w/8] per-pixel loss weights (data.masked_loss)
    source: str = "held-out"  # "held-out" | "training" (nothing held out: training samples at fixed noise)
    captions: list[str] = field(default_factory=list)  # [n*k], for live text encoders (sd35hub.train.live_text)


def make_heldout(batches: Any, seed: int, *, unmasked_weight: float = 0.0) -> HeldOut | None:
    """Fixed validation-loss inputs from ``CachedBatches.validation_batch``: the held-out samples, or
    (nothing held out) a few training samples at the same fixed noise (None for an empty cache)."""
    generator = torch.Generator().manual_seed(seed)
    batch = batches.validation_batch(generator=generator, sample=True)
    if batch is None:
        return None
    k = len(HELDOUT_SIGMAS)
    latents = batch["latents"].float().repeat_interleave(k, 0)
    return HeldOut(
        latents=latents,
        prompt_embeds=batch["prompt_embeds"].repeat_interleave(k, 0),
        pooled_prompt_embeds=batch["pooled_prompt_embeds"].repeat_interleave(k, 0),
        noise=torch.randn(latents.shape, generator=generator),
        sigmas=torch.tensor(HELDOUT_SIGMAS).repeat(len(batch["keys"])),
        keys=list(batch["keys"]),
        weights=_masked_weights(batch, unmasked_weight, k),
        source=batches.validation_source,
        captions=[c for c in batch.get("captions") or [] for _ in range(k)],
    )


def _masked_weights(batch: dict[str, Any], unmasked_weight: float, k: int) -> torch.Tensor | None:
    if "mask" not in batch:
        return None
    from sd35hub.data.masks import pixel_weights

    return pixel_weights(batch["mask"], unmasked_weight).repeat_interleave(k, 0)


def heldout_loss(transformer: Any, heldout: HeldOut, *, device: str | torch.device, dtype: torch.dtype,
                 autocast: Any = None, chunk: int = 8) -> float:
    """Mean unweighted flow loss on the fixed held-out inputs (no gradients)."""
    import contextlib

    total, count = 0.0, 0
    with torch.no_grad(), (autocast or contextlib.nullcontext()):
        for start in range(0, heldout.latents.shape[0], chunk):
            part = slice(start, start + chunk)
            losses = flow_loss(
                transformer, heldout.latents[part].to(device, dtype), heldout.prompt_embeds[part].to(device, dtype),
                heldout.pooled_prompt_embeds[part].to(device, dtype), heldout.noise[part].to(device, dtype),
                heldout.sigmas[part].to(device), reduction="none",
                pixel_weights=None if heldout.weights is None else heldout.weights[part],
            )  # fmt: skip
            total += float(losses.sum())
            count += losses.shape[0]
    return total / max(count, 1)


def validation_pipeline(model: str, transformer: Any, vae: Any, *, revision: str | None, tiling: bool) -> Any:
    """StableDiffusion3Pipeline(transformer, vae, scheduler) with no text encoders (embeddings are cached);
    ``vae`` may be None until :func:`attach_vae`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sd35hub.models.load import model_dir, resolve_model

    folder = model_dir(resolve_model(model, revision), ("scheduler",))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if vae is not None:  # None: attach_vae before the first decode (a run with a complete cache loads none before)
        attach_vae(pipe, vae, tiling=tiling)
    return pipe


def attach_vae(pipe: Any, vae: Any, *, tiling: bool) -> None:
    """Give a validation pipeline its VAE (and what the pipeline derives from it at construction)."""
    from diffusers.image_processor import VaeImageProcessor

    if tiling:  # decode 512 px tiles (the SD3.5 VAE's own tile size is its 1024 px sample size)
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
    pipe.register_modules(vae=vae)
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor)
