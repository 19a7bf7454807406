"""Value checks on adapter tensors and alphas (one place, on load), and ComfyUI full deltas as exact LoRAs.

Every tensor of an adapter file is checked when the file is read, whatever the command: a float dtype,
the right number of dimensions, rank >= 1, finite, and |w| <= MAX_ABS (a trained LoRA's weights are a few
units at most; 1e30 would give a black image). alpha must be one finite positive number.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sd35hub.errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sd35hub.adapters.formats_mmdit import LoraModule

MAX_ABS = 1e4  # largest |weight| accepted in a LoRA tensor
MAX_ALPHA = 1e6
_NDIMS = {"down": (2, 4), "up": (2, 4), "diff": (1, 2, 4), "diff_b": (1,), "lora_bias": (1,), "alpha": (0, 1)}


def check_tensor(key: str, tensor: Any, leaf: str) -> None:
    """Raise AdapterError unless `tensor` is a usable value for its leaf (see module docstring)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise AdapterError(f"{key!r} is not a tensor ({type(tensor).__name__}).")
    if not tensor.is_floating_point() or tensor.dtype not in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64
    ):  # fmt: skip
        raise AdapterError(
            f"{key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA tensors must be float16, "
            "bfloat16 or float32. The file is damaged or not a LoRA."
        )
    if tensor.ndim not in _NDIMS[leaf]:
        raise AdapterError(
            f"{key!r} has {tensor.ndim} dimensions {tuple(tensor.shape)}; not a LoRA {leaf} tensor."
        )
    if leaf == "alpha" and tensor.numel() != 1:
        raise AdapterError(
            f"{key!r} holds {tensor.numel()} values; a LoRA alpha is one number. Re-export the adapter."
        )
    if tensor.numel() == 0 or (leaf in ("down", "up") and 0 in tensor.shape):
        raise AdapterError(f"{key!r} is empty {tuple(tensor.shape)} (rank 0): the file is incomplete.")
    if leaf == "alpha":
        return  # checked as a number by check_alpha
    values = tensor.detach()
    if not bool(torch.isfinite(values).all()):
        raise AdapterError(
            f"{key!r} holds non-finite values (NaN or Inf): the adapter diverged in training or the file is "
            "damaged. Use an earlier checkpoint."
        )
    largest = float(values.abs().max())
    if largest > MAX_ABS:
        raise AdapterError(
            f"{key!r} holds |w| = {largest:.3g}, far beyond any trained LoRA (limit {MAX_ABS:g}); it would "
            "wreck the image. The adapter diverged or the file is damaged."
        )


def check_alpha(where: str, value: Any) -> float:
    """alpha (a tensor, number or JSON value) -> float, or AdapterError naming where it came from."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise AdapterError(f"{where!r}: alpha holds {value.numel()} values; it must be one number.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(
            f"{where}: alpha is {value!r} ({type(value).__name__}), not a number. Fix or remove the "
            "LoRA metadata and re-export the adapter."
        )
    alpha = float(value)
    if not math.isfinite(alpha) or alpha <= 0 or alpha > MAX_ALPHA:
        raise AdapterError(f"{where}: alpha {alpha!r} is not a positive finite number (<= {MAX_ALPHA:g}).")
    return alpha


def diff_as_lora(diff: torch.Tensor) -> LoraModule:
    """A full weight delta (ComfyUI `.diff`) [out, in] or [out, in, k, k] as an exact LoRA (scale 1).

    The identity goes on the smaller side: rank = min(out, in) for a linear, out for a conv (peft's conv
    LoRA keeps the kernel on lora_A). Exact: up @ down reproduces the delta bit for bit.
    """
    import torch

    from sd35hub.adapters.formats_mmdit import LoraModule

    out = int(diff.shape[0])
    if diff.ndim == 4:
        eye = torch.eye(out, dtype=diff.dtype).reshape(out, out, 1, 1)
        return LoraModule(down=diff.contiguous(), up=eye, alpha=float(out))
    inp = int(diff.shape[1])
    if out <= inp:
        return LoraModule(down=diff.contiguous(), up=torch.eye(out, dtype=diff.dtype), alpha=float(out))
    return LoraModule(down=torch.eye(inp, dtype=diff.dtype), up=diff.contiguous(), alpha=float(inp))
