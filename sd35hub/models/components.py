"""Phased loading: one component at a time, straight onto its device, with a log of loads and frees.

    vae = load_component(model, "vae", dtype="bf16", device="cuda")    # also text_encoder / _2 / _3
    ...
    release(vae); del vae; empty_cache()                               # gone before the next one loads

Every component loaded here or by sd35hub.models.load.load_transformer is logged in ``loader_log``
as ("load", name, device) and again as ("free", name, device) when released or garbage-collected;
``live_components()`` lists those still alive. The trainer's phase order is tested against this log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sd35hub.errors import ModelLoadError
from sd35hub.models.options import check_options, quantization_config, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

loader_log: list[tuple[str, str, str]] = []
_live: dict[int, str] = {}


def _track(module: Any, name: str, device: str | torch.device | None) -> None:
    import weakref

    where = str(device or "cpu")
    loader_log.append(("load", name, where))
    key = id(module)
    _live[key] = name

    def gone() -> None:
        if _live.pop(key, None) is not None:
            loader_log.append(("free", name, where))

    weakref.finalize(module, gone)


def live_components() -> list[str]:
    """Names of the components loaded through this module that are still alive."""
    return sorted(_live.values())


def release(module: Any) -> None:
    """Log ``module`` as freed. The caller then drops its last reference and calls :func:`empty_cache`."""
    name = _live.pop(id(module), None)
    if name is not None:
        loader_log.append(("free", name, str(_device_of(module))))


def empty_cache() -> None:
    """Collect garbage and give the CUDA allocator's free blocks back (after the last reference is gone)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_of(module: Any) -> Any:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return "cpu"


def _device_map(device: str | torch.device | None) -> dict[str, Any]:
    """from_pretrained kwargs that put each tensor on a CUDA device as it is read."""
    if device is None or not str(device).startswith("cuda"):
        return {}
    return {"device_map": {"": str(device)}, "low_cpu_mem_usage": True}


_COMPONENT_CLASSES = {
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}


def load_component(
    model: str,
    name: str,
    *,
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    quantize: str = "none",
    device: str | torch.device | None = None,
) -> Any:
    """One text encoder or the VAE, loaded straight onto ``device`` (never a whole copy in host RAM),
    NF4/int8-quantized while loading when ``quantize`` says so (text encoders; bitsandbytes, CUDA).
    Free it with :func:`release` before the next component of a phased run loads."""
    import importlib

    from sd35hub.models.locate import _loading, model_dir, resolve_model

    check_options(quantize)
    if name not in _COMPONENT_CLASSES:
        raise ModelLoadError(f"load_component: unknown component {name!r} (one of {', '.join(_COMPONENT_CLASSES)})")
    weights_dtype = torch_dtype(dtype, str(device) if device is not None else None)
    ref = resolve_model(model, revision)
    folder = model_dir(ref, (name,))
    library, class_name = _COMPONENT_CLASSES[name]
    cls = getattr(importlib.import_module(library), class_name)
    kwargs: dict[str, Any] = {"dtype": weights_dtype, **_device_map(device)}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, weights_dtype, library=library)
    from sd35hub.models.stream import load_streamed, quantized_device, use_streaming

    with _loading(model, folder):
        if use_streaming():  # tensor by tensor onto the device: bounded host memory (sd35hub.models.stream)
            module = load_streamed(library, class_name, folder / name, dtype=weights_dtype,
                                   device=quantized_device(device, quantize), quantize=quantize)  # fmt: skip
        else:  # SD35HUB_LOADER=mmap: the library's from_pretrained (maps the weights files)
            module = cls.from_pretrained(folder, subfolder=name, **kwargs)
    if device is not None and quantize == "none" and "device_map" not in kwargs and not use_streaming():
        module = module.to(device)
    module.requires_grad_(False)
    module.eval()
    _track(module, name, device)
    return module


def load_tokenizer(model: str, name: str, *, revision: str | None = None) -> Any:
    """tokenizer (CLIP-L), tokenizer_2 (CLIP-G) or tokenizer_3 (T5)."""
    from transformers import AutoTokenizer

    from sd35hub.models.locate import _loading, model_dir, resolve_model

    ref = resolve_model(model, revision)
    folder = model_dir(ref, (name,))
    with _loading(model, folder):
        return AutoTokenizer.from_pretrained(folder, subfolder=name)
