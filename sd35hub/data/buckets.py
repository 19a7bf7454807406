"""Aspect-ratio buckets: every image trains at (about) the target pixel count, in its own shape.

    bucket_set(1024) -> [(1024, 1024), (1088, 960), (960, 1088), (1152, 896), (896, 1152),
                         (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1472, 704),
                         (704, 1472), (1536, 640), (640, 1536)]          # (width, height)

Rule: for each height h from ``resolution`` down in steps of 64, the width is the largest
multiple of 64 with ``w * h <= resolution²`` (never above the budget), capped at 2.4 × h (12:5);
the set stops where the uncapped width would pass 2.5 × h. Transposes give the portrait half.
A base model bounds both sides: its positional embedding covers at most ``pos_embed_max_size``
patches of ``patch_size`` latent pixels of 8 image pixels (512 px for the tiny model, 3072 px for
SD3.5 Large): :func:`bounded_buckets` clamps the resolution to that, and a bucket with a longer
side to that side at (about) its aspect ratio, saying which.

Each image goes to the bucket with the closest log aspect ratio, is resized to cover it, then
center- or random-cropped; the crop's top-left corner and the original size are recorded
(``(top, left)`` and ``(height, width)``, the SDXL convention).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch

    from sd35hub.data.sources import Sample

Bucket = tuple[int, int]  # (width, height) in pixels, multiples of 64
MAX_BUCKET_ASPECT = 2.4  # widest bucket: 12:5
LAST_BUCKET_ASPECT = 2.5  # stop adding buckets beyond this uncapped aspect


def bucket_set(resolution: int) -> list[Bucket]:
    """All buckets for a target side (multiple of 64), square first, then wider pairs."""
    if resolution < 64 or resolution % 64:
        raise ValueError(f"resolution must be a positive multiple of 64, got {resolution}")
    budget = resolution * resolution
    buckets: list[Bucket] = []
    for height in range(resolution, 63, -64):
        full_width = (budget // height) // 64 * 64
        if full_width / height > LAST_BUCKET_ASPECT:
            break
        width = min(full_width, int(MAX_BUCKET_ASPECT * height) // 64 * 64)
        if width < height:
            continue
        for bucket in ((width, height), (height, width)):
            if bucket not in buckets:
                buckets.append(bucket)
    return buckets


def bounded_buckets(resolution: int, max_side: int | None) -> tuple[int, list[Bucket], list[str]]:
    """(resolution, buckets, notes) for a base whose positional grid allows sides up to ``max_side``
    pixels: the resolution is clamped to the largest multiple of 64 not above it, and a bucket with
    a longer side is clamped to it, its other side scaled to keep (about) its aspect ratio (at most
    12:5; duplicates dropped). One note per change, for the log. ``max_side=None``: no bound."""
    notes: list[str] = []
    if max_side is not None and max_side < 64:
        raise ValueError(f"the base model's largest image side is {max_side} px, below the smallest bucket (64 px)")
    bound = max_side // 64 * 64 if max_side is not None else None
    if bound is not None and resolution > bound:
        notes.append(f"data.resolution={resolution} is above the {max_side} px the base model's positional "
                     f"embedding covers: training at {bound} px")
        resolution = bound
    buckets = bucket_set(resolution)
    if bound is None:
        return resolution, buckets, notes
    bounded: list[Bucket] = []
    clamped: list[str] = []
    for width, height in buckets:
        if max(width, height) > bound:
            short = max(64, round(min(width, height) * bound / max(width, height) / 64) * 64)
            while bound / short > MAX_BUCKET_ASPECT:
                short += 64
            new = (bound, short) if width >= height else (short, bound)
            clamped.append(f"{width}x{height}->{new[0]}x{new[1]}")
            width, height = new
        if (width, height) not in bounded:
            bounded.append((width, height))
    if clamped:
        notes.append(f"{len(clamped)} aspect bucket(s) clamped to the base model's {max_side} px side "
                     f"({', '.join(clamped)}); {len(bounded)} bucket(s) in use")
    return resolution, bounded, notes


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height in log space (ties: first listed)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def resize_and_crop(
    image: Image.Image, bucket: Bucket, crop: str = "center", rng: random.Random | None = None
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize to cover ``bucket`` (aspect kept), then crop to it.

    Returns (image of exactly bucket size, crop top-left (top, left), original size (height, width)).
    """
    width, height = image.size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_w = max(bucket_w, round(width * scale))
    new_h = max(bucket_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        # reducing_gap: JPEG-style box pre-shrink for big downscales, ~3x faster, no visible loss
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, new_w - bucket_w), rng.randint(0, new_h - bucket_h)
    else:
        left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
    if (new_w, new_h) != bucket:
        image = image.crop((left, top, left + bucket_w, top + bucket_h))
    return image, (top, left), (height, width)


@dataclass
class Batch:
    bucket: Bucket  # (width, height) shared by every sample
    keys: list[str]
    pixel_values: torch.Tensor  # [b, 3, h, w] float32 in [-1, 1]
    captions: list[str]
    crop_coords: list[tuple[int, int]]  # (top, left) per sample, in resized pixels
    original_sizes: list[tuple[int, int]]  # (height, width) before resizing
    content_hashes: list[str]  # sha256 of each raw image file
    masks: torch.Tensor | None = None  # [b, 1, h, w] in [0, 1] when a sample has a loss mask (sd35hub.data.masks)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Pending:
    key: str
    image: Image.Image  # already bucket-sized (uint8 RGB): the buffer holds small images only
    caption: str
    crop: tuple[int, int]
    original: tuple[int, int]
    content_hash: str
    mask: Image.Image | None = None  # bucket-sized loss mask


def to_pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """RGB uint8 images of one size -> float32 [b, 3, h, w] in [-1, 1]."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [b, h, w, 3]
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class BucketBatcher:
    """Single-bucket batches from a stream, through a bounded, seeded shuffle buffer.

    Samples are resized into their bucket as they arrive and held (at most ``buffer_size`` of
    them). Whenever the buffer is full, one batch leaves: a random bucket among those holding at
    least ``batch_size`` samples (random members of it), else the fullest bucket as a smaller
    batch. At the end every bucket is drained the same way; leftovers smaller than ``batch_size``
    are emitted unless ``drop_last``. The same seed and stream always give the same batches.
    """

    def __init__(self, samples: Iterable[Sample], buckets: list[Bucket], batch_size: int,
                 buffer_size: int = 64, seed: int = 0, crop: str = "center", drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.samples = samples
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.buffer_size = max(buffer_size, batch_size)
        self.seed = seed
        self.crop = crop
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[Batch]:
        from sd35hub.data.sources import stable_seed

        rng = random.Random(stable_seed("batcher", self.seed))
        pending: dict[Bucket, list[_Pending]] = {b: [] for b in self.buckets}
        held = 0
        for sample in self.samples:
            bucket = assign_bucket(*sample.image.size, self.buckets)
            crop_rng = random.Random(stable_seed("crop", self.seed, sample.key))
            image, crop, original = resize_and_crop(sample.image, bucket, self.crop, crop_rng)
            mask = getattr(sample, "mask", None)
            if mask is not None:
                from sd35hub.data.masks import resize_and_crop_mask

                mask = resize_and_crop_mask(mask, bucket, crop)
            pending[bucket].append(_Pending(sample.key, image, sample.caption, crop, original, sample.content_hash, mask))
            held += 1
            if held >= self.buffer_size:
                batch = self._take(pending, rng)
                held -= len(batch)
                yield batch
        while held:
            if self.drop_last and all(len(v) < self.batch_size for v in pending.values()):
                return
            batch = self._take(pending, rng)
            held -= len(batch)
            yield batch

    def _take(self, pending: dict[Bucket, list[_Pending]], rng: random.Random) -> Batch:
        ready = [b for b in self.buckets if len(pending[b]) >= self.batch_size]
        if ready:
            bucket = rng.choice(ready)
        else:
            bucket = max(self.buckets, key=lambda b: len(pending[b]))  # first listed on ties
        members = pending[bucket]
        chosen = sorted(rng.sample(range(len(members)), min(self.batch_size, len(members))))
        picked = [members[i] for i in chosen]
        pending[bucket] = [m for i, m in enumerate(members) if i not in set(chosen)]
        rng.shuffle(picked)
        return Batch(
            bucket=bucket,
            keys=[p.key for p in picked],
            pixel_values=to_pixel_values([p.image for p in picked]),
            captions=[p.caption for p in picked],
            crop_coords=[p.crop for p in picked],
            original_sizes=[p.original for p in picked],
            content_hashes=[p.content_hash for p in picked],
            masks=_masks(picked, bucket),
        )


def _masks(picked: list[_Pending], bucket: Bucket) -> torch.Tensor | None:
    if all(p.mask is None for p in picked):
        return None
    from sd35hub.data.masks import to_mask_tensor

    return to_mask_tensor([p.mask for p in picked], bucket)
