"""Turning untrusted bytes into RGB images and captions: fix what can be fixed, count the rest.

Bad input never stops a run. Every record ends up either *usable* (possibly after a fix: mode
conversion, EXIF rotation, empty caption) or *skipped* with a reason; both are tallied in a
:class:`SkipStats` that the run reports at the end and in the model card.

Skip reasons: ``empty_file``, ``missing_image``, ``unreadable_file`` (permissions, I/O error),
``unsupported_format`` (not an image PIL can identify, e.g. HEIC without a plugin, whatever its
name says), ``corrupt`` (truncated or broken), ``decompression_bomb``, ``too_small``,
``extreme_aspect``, ``bad_caption_encoding``, ``bad_caption_type`` (a number or mapping, not
text), ``bad_metadata_row`` (a metadata.jsonl line that is not a JSON object), ``path_outside_folder``
(absolute or ``..`` paths in metadata), ``bad_image_value`` (a parquet cell that is not image bytes).
Fixes: ``exif_rotated``, ``mode_<MODE>`` (converted to RGB), ``missing_caption`` and
``empty_caption`` (kept with an empty caption: the trigger word, if set, still applies),
``caption_truncated`` (over MAX_CAPTION_CHARS).
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

# Our own pixel ceiling (checked on the header, before any pixel is decoded): 64 megapixels,
# i.e. 8192 x 8192, is larger than any sane training image and ~200 MB as RGB.
MAX_PIXELS = 8192 * 8192

# .avif decodes with Pillow >= 11.3 (built with libavif); .heic/.heif only with a HEIF plugin
# registered (pillow-heif), otherwise they are counted as unsupported_format, never silently ignored
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif")
# signatures of formats PIL reads: such a file that PIL cannot identify is broken, not of another format
_KNOWN_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
MAX_CAPTION_CHARS = 20_000  # longer captions are cut (the text encoders read <= 512 tokens anyway)


@dataclass
class SkipStats:
    """What happened to each record of a source: counts by reason, filled while iterating."""

    seen: int = 0  # records read from the source
    usable: int = 0  # samples handed to the caller
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count (sample dropped)
    fixed: Counter[str] = field(default_factory=Counter)  # fix -> count (sample kept)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def fix(self, what: str) -> None:
        self.fixed[what] += 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``"18 usable of 21 seen; skipped: corrupt 2, too_small 1; fixed: mode_RGBA 1"``."""
        line = f"{self.usable} usable of {self.seen} seen"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        if self.fixed:
            line += "; fixed: " + ", ".join(f"{k} {v}" for k, v in sorted(self.fixed.items()))
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "usable": self.usable,
            "skipped": dict(sorted(self.skipped.items())),
            "fixed": dict(sorted(self.fixed.items())),
        }

    def merge(self, other: SkipStats) -> None:
        self.seen += other.seen
        self.usable += other.usable
        self.skipped.update(other.skipped)
        self.fixed.update(other.fixed)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF-transposed, fully loaded
    content_hash: str  # sha256 hex of the raw file bytes (the cache keys on it)
    fixes: tuple[str, ...]  # e.g. ("exif_rotated", "mode_CMYK")


def decode_image(
    data: bytes | None,
    *,
    min_size: int = 0,
    max_aspect: float = float("inf"),
    max_pixels: int = MAX_PIXELS,
) -> DecodedImage | str:
    """Decode untrusted image bytes to RGB, or return the skip reason (a string).

    Sizes are checked on the header before pixels are decoded, so a decompression bomb or an
    out-of-range image costs next to nothing. PIL's own bomb check (a global,
    ``Image.MAX_IMAGE_PIXELS``) is left as it is; its warning is turned into a skip here only
    inside a ``warnings.catch_warnings`` block, which restores the filters on exit.
    """
    if data is None:
        return "missing_image"
    if len(data) == 0:
        return "empty_file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return "decompression_bomb"
            if width <= 0 or height <= 0:
                return "corrupt"
            if min(width, height) < min_size:
                return "too_small"
            if max(width, height) / min(width, height) > max_aspect:
                return "extreme_aspect"
            image.load()  # truncated files raise OSError here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "decompression_bomb"
    except UnidentifiedImageError:
        return "corrupt" if data.startswith(_KNOWN_MAGIC) or data[8:12] == b"WEBP" else "unsupported_format"
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError, RecursionError,
            ZeroDivisionError, IndexError, KeyError, TypeError, AttributeError):  # noqa: B014 - plugins raise anything
        return "corrupt"

    fixes: list[str] = []
    try:
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation tag
        if orientation not in (None, 1):
            image = ImageOps.exif_transpose(image)
            fixes.append("exif_rotated")
    except Exception:  # noqa: BLE001 - broken EXIF blocks are common; the pixels are still fine
        pass
    if image.mode != "RGB":
        fixes.append(f"mode_{image.mode}")
        try:
            image = to_rgb(image)
        except (OSError, ValueError):
            return "corrupt"
    return DecodedImage(image=image, content_hash=hashlib.sha256(data).hexdigest(), fixes=tuple(fixes))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (what a viewer shows), 16-bit and
    32-bit integer images are scaled down to 8 bits (not clipped), float images are min-max scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        import numpy as np

        pixels = np.asarray(image, dtype=np.float64)
        if mode == "F":
            lo, hi = float(pixels.min()), float(pixels.max())
            pixels = (pixels - lo) / (hi - lo or 1.0) * 255.0
        elif pixels.max() > 255:  # 16-bit range (I;16 and most mode-I PNGs)
            pixels = pixels / 257.0
        gray = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, 1


def decode_caption(raw: str | bytes | None) -> str | None:
    """Caption text from a str or from bytes of unknown encoding; None when it cannot be decoded.

    Tries UTF-8 with BOM, UTF-16 with BOM, then plain UTF-8. Latin-1 is *not* a fallback: it
    "decodes" anything, so mojibake would silently become training captions.
    """
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, bytearray)):
        return None
    raw = bytes(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        encodings = ("utf-8-sig",)
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encodings = ("utf-16",)
    else:
        encodings = ("utf-8",)
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\x00" in text:  # UTF-16 without a BOM decodes as UTF-8 full of NULs
            return None
        return text
    return None


def clean_caption(text: str) -> str:
    """Collapse whitespace and newlines: captions are one line."""
    return " ".join(text.split())
