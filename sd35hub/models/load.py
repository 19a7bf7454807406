"""One loading path for every base model: a Hub id, a local diffusers folder, or "tiny".

    resolve_model(name)  ->  ModelRef (tiny folder | local folder | Hub id, validated)
    model_dir(ref, components)
        Hub: sd35hub.access.check_read_access (license/token, before any byte is downloaded), then
             snapshot_download of only the subfolders the components need — never the 10-16 GB
             single-file checkpoint that SD3.5 repos also keep at their root
        local / tiny: the folder itself
    diffusers / transformers from_pretrained(folder, dtype=...)  (+ bitsandbytes, attention backend)

The tiny model goes through exactly the same code as stabilityai/stable-diffusion-3.5-large, so the
tests of this path are tests of the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.errors import ModelLoadError
from sd35hub.models.components import (  # noqa: F401 - re-exported: the phased-loading API
    _device_map,
    _track,
    empty_cache,
    live_components,
    load_component,
    load_tokenizer,
    loader_log,
    release,
)
from sd35hub.models.info import ModelInfo, detect_variant, model_info_from_config
from sd35hub.models.locate import (  # noqa: F401 - re-exported: where a base is and how its folder is read
    ALL_COMPONENTS,
    TEXT_COMPONENTS,
    TINY,
    ModelRef,
    _loading,
    cached_model_dir,
    model_dir,
    resolve_model,
)
from sd35hub.models.options import check_options, quantization_config, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

__all__ = [
    "ModelRef",
    "ModelInfo",
    "detect_variant",
    "model_info_from_config",
    "resolve_model",
    "model_dir",
    "model_info",
    "load_pipeline",
    "load_transformer",
    "load_text_encoders",
    "load_vae",
    "load_component",
    "release",
    "empty_cache",
    "loader_log",
    "live_components",
    "torch_dtype",
]

def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not readable JSON ({exc}); re-download or re-save the model."
        ) from exc


def _transformer_subfolder(folder: Path, name: str) -> str | None:
    """'transformer' for a pipeline folder; None for a bare transformer folder (config.json at the root)."""
    if (folder / "transformer" / "config.json").is_file():
        return "transformer"
    root = _read_json(folder / "config.json")
    if root and root.get("_class_name") == "SD3Transformer2DModel":
        return None
    raise ModelLoadError(
        f"{name} has no transformer/config.json: it is not a complete SD3/SD3.5 diffusers model."
    )


def model_info(model: str, revision: str | None = None) -> ModelInfo:
    """Variant and transformer shape from the configs only (model_index.json, transformer/config.json)."""
    ref = resolve_model(model, revision)
    folder = model_dir(ref, ("transformer", "scheduler"), configs_only=True)
    subfolder = _transformer_subfolder(folder, model)
    transformer_config = _read_json(folder / (subfolder or ".") / "config.json") or {}
    return model_info_from_config(
        model,
        transformer_config,
        _read_json(folder / "model_index.json"),
        _read_json(folder / "scheduler" / "scheduler_config.json"),
        revision=revision,
    )


def _check_is_sd3(folder: Path, name: str) -> None:
    index = _read_json(folder / "model_index.json")
    if index is None:
        raise ModelLoadError(f"{name} has no model_index.json: it is not a diffusers pipeline folder.")
    transformer = index.get("transformer") or [None, None]
    if transformer[1] != "SD3Transformer2DModel":
        raise ModelLoadError(
            f"{name} is a {index.get('_class_name', 'unknown')} model (transformer {transformer[1]}), "
            "not Stable Diffusion 3/3.5. Pass an SD3.5 model, e.g. stabilityai/stable-diffusion-3.5-medium."
        )


def load_transformer(
    model: str,
    *,
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    quantize: str = "none",
    device: str | None = None,
) -> SD3Transformer2DModel:
    """The MMDiT alone (what LoRA training wraps), optionally NF4/int8-quantized (then on the GPU).

    On a CUDA ``device`` the weights go straight there while loading (``device_map``, one tensor at a
    time from the safetensors file): no full copy is ever held in host memory."""
    check_options(quantize)
    weights_dtype = torch_dtype(dtype, device)
    ref = resolve_model(model, revision)
    folder = model_dir(ref, ("transformer",))
    subfolder = _transformer_subfolder(folder, model)
    from diffusers import SD3Transformer2DModel

    from sd35hub.models.stream import load_streamed, quantized_device, use_streaming

    with _loading(model, folder):
        if use_streaming():  # tensor by tensor onto the device, bounded host memory (sd35hub.models.stream)
            transformer = load_streamed("diffusers", "SD3Transformer2DModel", folder / (subfolder or "."),
                                        dtype=weights_dtype, device=quantized_device(device, quantize),
                                        quantize=quantize)  # fmt: skip
        else:  # SD35HUB_LOADER=mmap: the library's from_pretrained (maps the shards)
            transformer = SD3Transformer2DModel.from_pretrained(
                folder,
                subfolder=subfolder,
                dtype=weights_dtype,
                quantization_config=quantization_config(quantize, weights_dtype),
                **_device_map(device),
            )
    if device is not None and quantize == "none":
        transformer = transformer.to(device)
    _track(transformer, "transformer", device)
    return transformer


def load_vae(
    model: str, *, dtype: str | torch.dtype = "fp32", revision: str | None = None, device: str | None = None
) -> AutoencoderKL:
    """The VAE (latents: [b, 16, h/8, w/8]; scale with config.shift_factor / scaling_factor)."""
    ref = resolve_model(model, revision)
    folder = model_dir(ref, ("vae",))
    from diffusers import AutoencoderKL

    from sd35hub.models.stream import load_streamed, use_streaming

    with _loading(model, folder):
        if use_streaming():
            return load_streamed("diffusers", "AutoencoderKL", folder / "vae", dtype=torch_dtype(dtype, device),
                                 device=device)  # fmt: skip
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch_dtype(dtype, device))
    return vae.to(device) if device is not None else vae


def load_text_encoders(
    model: str,
    *,
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    drop_t5: bool = False,
    quantize_t5: str = "none",
    device: str | None = None,
) -> StableDiffusion3Pipeline:
    """A pipeline holding only the tokenizers and text encoders, for `pipe.encode_prompt(...)`.

    Returns prompt_embeds [b, 77 + 256, joint_attention_dim] and pooled_prompt_embeds [b, 2048]
    (tiny: [b, 77 + 256, 64] and [b, 64]). transformer and vae are None: nothing else is downloaded.
    With drop_t5, diffusers' encode_prompt needs `transformer.config.joint_attention_dim` for its
    zero T5 block, which this pipeline lacks: use `_get_clip_prompt_embeds` and pad to
    `model_info(model).joint_attention_dim`, or load the full pipeline.
    """
    return _load_pipeline(
        model, dtype=dtype, revision=revision, quantize="none", quantize_t5=quantize_t5,
        attention="sdpa", drop_t5=drop_t5, device=device, components=TEXT_COMPONENTS + ("scheduler",),
    )  # fmt: skip


def load_pipeline(
    model: str,
    *,
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    quantize: str = "none",
    attention: str = "sdpa",
    drop_t5: bool = False,
    device: str | None = None,
) -> StableDiffusion3Pipeline:
    """The full StableDiffusion3Pipeline of `model` ("tiny", a local folder or a Hub id).

    quantize nf4/int8 applies to the transformer (bitsandbytes, CUDA only). drop_t5 leaves out
    T5-XXL (text_encoder_3/tokenizer_3 = None: ~9 GB less, prompts follow less closely).
    device None keeps the weights on the CPU; callers on a small GPU can use
    `pipe.enable_model_cpu_offload()` instead of `device="cuda"`.
    """
    return _load_pipeline(
        model, dtype=dtype, revision=revision, quantize=quantize, quantize_t5="none",
        attention=attention, drop_t5=drop_t5, device=device, components=ALL_COMPONENTS,
    )  # fmt: skip


def _load_pipeline(
    model: str,
    *,
    dtype: str | torch.dtype,
    revision: str | None,
    quantize: str,
    quantize_t5: str,
    attention: str,
    drop_t5: bool,
    device: str | None,
    components: tuple[str, ...],
) -> StableDiffusion3Pipeline:
    check_options(quantize, attention)
    check_options(quantize_t5)
    weights_dtype = torch_dtype(dtype, device)
    ref = resolve_model(model, revision)
    wanted = [c for c in components if not (drop_t5 and c.endswith("_3"))]
    folder = model_dir(ref, wanted)
    _check_is_sd3(folder, model)
    from diffusers import StableDiffusion3Pipeline

    # Components passed explicitly: None leaves one out (nothing is read for it).
    overrides: dict[str, Any] = {c: None for c in ALL_COMPONENTS if c not in wanted}
    if quantize != "none" and "transformer" in wanted:
        overrides["transformer"] = load_transformer(
            model, dtype=weights_dtype, revision=revision, quantize=quantize
        )
    if quantize_t5 != "none" and "text_encoder_3" in wanted:
        from transformers import T5EncoderModel

        with _loading(model, folder):
            overrides["text_encoder_3"] = T5EncoderModel.from_pretrained(
                folder,
                subfolder="text_encoder_3",
                dtype=weights_dtype,
                quantization_config=quantization_config(quantize_t5, weights_dtype, library="transformers"),
            )
    with _loading(model, folder):
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=weights_dtype, **overrides)
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if device is not None:
        pipe = pipe.to(device)
    return pipe
