"""``sd35hub data preview``: a PNG grid of samples as training will see them, plus a summary.

Each tile is a sample resized and cropped into its bucket (as the trainer crops it), labelled
with the bucket and the caption after tweaks. The summary counts the records scanned, the
bucket histogram and the skips by reason: the first thing to look at before a long run.
"""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sd35hub.config import DataSpec
from sd35hub.data.buckets import assign_bucket, bucket_set, resize_and_crop
from sd35hub.data.images import SkipStats
from sd35hub.data.sources import SampleStream, no_usable_message, stable_seed
from sd35hub.errors import DatasetError
from sd35hub.paths import atomic_write

TILE = 256  # longest side of a tile, pixels
LABEL_LINES = 4


@dataclass
class PreviewSummary:
    out: Path
    shown: int
    stats: SkipStats
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> samples, over everything scanned

    def lines(self) -> list[str]:
        out = [f"wrote {self.out} ({self.shown} samples)", f"scanned: {self.stats.summary()}"]
        out.append("buckets: " + ", ".join(f"{k} {v}" for k, v in self.buckets.items()))
        return out


def preview_grid(spec: DataSpec, n: int = 16, out: Path = Path("preview.png"), resolution: int | None = None,
                 *, scan: int | None = 200, seed: int = 0, token: str | bool | None = None) -> PreviewSummary:
    """Write a grid of the first ``n`` usable samples; scan up to ``scan`` records (None: all)."""
    resolution = resolution or spec.resolution or 1024  # data.resolution unset: the GPU profiles' usual side
    buckets = bucket_set(resolution)
    stream = SampleStream(spec, seed=seed, token=token, max_records=scan)
    tiles: list[Image.Image] = []
    histogram: Counter[str] = Counter()
    for sample in stream:
        bucket = assign_bucket(*sample.image.size, buckets)
        histogram[f"{bucket[0]}x{bucket[1]}"] += 1
        if len(tiles) < n:
            rng = random.Random(stable_seed("crop", seed, sample.key))
            image, crop, _ = resize_and_crop(sample.image, bucket, spec.crop, rng)
            if spec.masked_loss and sample.mask is not None:  # ignored pixels darkened and tinted red
                from sd35hub.data.masks import overlay, resize_and_crop_mask

                image = overlay(image, resize_and_crop_mask(sample.mask, bucket, crop))
            tiles.append(_tile(image, f"{bucket[0]}x{bucket[1]}  {sample.key}", sample.caption))
    if not tiles:
        raise DatasetError(no_usable_message(spec, stream.stats))
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tiles[0].width, rows * tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * tile.width, (i // cols) * tile.height))
    out = atomic_write(Path(out), lambda temp: grid.save(temp, format="PNG"))
    ordered = dict(sorted(histogram.items(), key=lambda kv: -kv[1]))
    return PreviewSummary(out=out, shown=len(tiles), stats=stream.stats, buckets=ordered)


def _tile(image: Image.Image, header: str, caption: str) -> Image.Image:
    font = ImageFont.load_default(size=12)
    line_height = 14
    image = image.copy()
    image.thumbnail((TILE, TILE))
    tile = Image.new("RGB", (TILE + 8, TILE + 8 + line_height * (LABEL_LINES + 1)), "white")
    tile.paste(image, (4 + (TILE - image.width) // 2, 4 + (TILE - image.height) // 2))
    draw = ImageDraw.Draw(tile)
    # at most what the tile shows is wrapped: a 10 MB caption without spaces must not take minutes
    shown = (caption or "(empty caption)")[: 40 * (LABEL_LINES + 1)]
    lines = [header[:40]] + textwrap.wrap(shown, width=40)[:LABEL_LINES]
    for i, line in enumerate(lines):
        draw.text((4, TILE + 8 + i * line_height), line, fill=(0, 0, 0) if i else (40, 90, 200), font=font)
    return tile
