"""Load options checked before any download: weights dtype, bitsandbytes quantization, attention.

Each check fails fast with the fix (missing package -> the pip extra; no GPU -> what to pass instead).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from sd35hub.errors import ConfigError, HardwareError, MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}  # fmt: skip
QUANTIZATION = ("none", "nf4", "int8")
ATTENTION = ("sdpa", "xformers")


def torch_dtype(dtype: str | torch.dtype, device: str | None = None) -> torch.dtype:
    """'fp32'/'fp16'/'bf16' (or the long names, or a torch.dtype) -> torch.dtype.

    'auto': bf16 on a CUDA GPU that supports it, else fp16 on CUDA, else fp32 (CPU).
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if not on_cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError(
            f"model.dtype={dtype!r} is not one of auto, fp32, fp16, bf16; pass --dtype bf16 (GPU) or fp32 (CPU)"
        )
    return getattr(torch, DTYPES[dtype])


def check_options(quantize: str, attention: str = "sdpa") -> None:
    """Fail before any download when an option cannot work on this machine."""
    if quantize not in QUANTIZATION:
        raise ConfigError(f"model.quantize={quantize!r} is not one of {', '.join(QUANTIZATION)}")
    if attention not in ATTENTION:
        raise ConfigError(f"model.attention={attention!r} is not one of {', '.join(ATTENTION)}")
    if quantize != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError("bitsandbytes", f"--quantize {quantize}", extra="quant")
        import torch

        if not torch.cuda.is_available():
            raise HardwareError(
                f"--quantize {quantize} (bitsandbytes) needs a CUDA GPU and none is visible. "
                "Run with --quantize none on CPU, or on a machine with an NVIDIA GPU."
            )
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise MissingDependencyError("xformers", "--attention xformers", extra="xformers")


def quantization_config(quantize: str, compute_dtype: torch.dtype, library: str = "diffusers") -> Any:
    """bitsandbytes config for diffusers models (transformer) or transformers models (T5)."""
    if quantize == "none":
        return None
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)
