"""Loss masks (``data.masked_loss``): which pixels of an image the loss looks at.

A mask comes from a same-name ``<stem>.mask.png`` beside the image in a folder source (white = train
on it, black = ignore; grey = in between), else from the image's alpha channel (opaque = train). An
image without either trains everywhere (counted as the fix ``no_mask``). The mask is EXIF-rotated like
its image, resized and cropped into the image's bucket with the same geometry, then area-averaged to
the latent grid (h/8 x w/8) when the latents are cached: ``CACHE/<entry>/mask`` [1, h/8, w/8] in [0, 1].

The per-pixel loss weight is ``unmasked_weight + (1 - unmasked_weight) * mask`` and the loss of a sample
is the weighted mean ``sum(w * err²) / sum(w)`` over its latent pixels (and channels): a masked-out
pixel (weight 0) contributes exactly nothing, and the loss keeps its scale whatever the mask's area.
``*.mask.png`` files are never read as training images.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

MASK_SUFFIX = ".mask.png"


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_path_for(image_path: Path) -> Path:
    """``photos/dog.jpg`` -> ``photos/dog.mask.png``."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX)


def _transposed(image: Image.Image) -> Image.Image:
    try:
        if image.getexif().get(0x0112, 1) not in (None, 1):
            return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF: the pixels are still fine (as for the image)
        pass
    return image


def alpha_mask(image_bytes: bytes) -> Image.Image | None:
    """The alpha channel (mode L, EXIF-rotated) of an image that has one, else None."""
    try:
        image = Image.open(io.BytesIO(image_bytes))
        if not (image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)):
            return None
        image.load()
        return _transposed(image).convert("RGBA").getchannel("A")
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def decode_mask_file(data: bytes, size: tuple[int, int]) -> Image.Image | None:
    """A mask file's pixels as mode L at the image's (already EXIF-rotated) size; None if unreadable."""
    try:
        mask = Image.open(io.BytesIO(data))
        if mask.width * mask.height > 8192 * 8192:
            return None
        mask.load()
        mask = _transposed(mask)
        mask = mask.convert("L")  # luminance: white = train, black = ignore
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def find_mask(image_path: Path | None, image_bytes: bytes, size: tuple[int, int]) -> tuple[Image.Image | None, str]:
    """(mask or None, where it came from: "file" | "alpha" | "none" | "unreadable")."""
    if image_path is not None:
        path = mask_path_for(image_path)
        if path.is_file():
            mask = decode_mask_file(path.read_bytes(), size)
            return (mask, "file") if mask is not None else (None, "unreadable")
    mask = alpha_mask(image_bytes)
    if mask is not None and mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return (mask, "alpha") if mask is not None else (None, "none")


def combined_hash(image_hash: str, mask: Image.Image | None) -> str:
    """The cache key of an image together with its mask (a changed mask is encoded again)."""
    if mask is None:
        return image_hash
    digest = hashlib.sha256(image_hash.encode())
    digest.update(repr(mask.size).encode())
    digest.update(mask.tobytes())
    return digest.hexdigest()


def resize_and_crop_mask(mask: Image.Image, bucket: tuple[int, int], top_left: tuple[int, int]) -> Image.Image:
    """The mask through the geometry :func:`sd35hub.data.buckets.resize_and_crop` gave its image."""
    width, height = mask.size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        mask = mask.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = top_left
    if (new_w, new_h) != bucket:
        mask = mask.crop((left, top, left + bucket_w, top + bucket_h))
    return mask


def to_mask_tensor(masks: list[Image.Image | None], size: tuple[int, int]) -> torch.Tensor:
    """Bucket-sized L masks (None: all ones) -> float32 [b, 1, h, w] in [0, 1]."""
    import numpy as np
    import torch

    width, height = size
    rows = [np.ones((height, width), np.float32) if m is None else np.asarray(m, dtype=np.float32) / 255.0 for m in masks]
    return torch.from_numpy(np.stack(rows))[:, None]


def latent_mask(masks: torch.Tensor | None, latent_hw: tuple[int, int], batch: int) -> torch.Tensor:
    """Pixel masks [b, 1, h, w] area-averaged to the latent grid [b, 1, h/8, w/8] (None: ones)."""
    import torch
    import torch.nn.functional as F

    if masks is None:
        return torch.ones(batch, 1, *latent_hw)
    return F.interpolate(masks.float(), size=latent_hw, mode="area").clamp_(0.0, 1.0)


def pixel_weights(mask: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """Per-pixel loss weight from a [0, 1] mask: unmasked_weight where the mask is 0, 1 where it is 1."""
    if unmasked_weight == 0.0:
        return mask.float()
    return unmasked_weight + (1.0 - unmasked_weight) * mask.float()


def overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The preview's view of a masked sample: ignored pixels darkened and tinted red."""
    red = Image.new("RGB", image.size, (160, 0, 0))
    dark = Image.blend(image.convert("RGB"), red, 0.55)
    return Image.composite(image.convert("RGB"), dark, mask.convert("L"))
