"""Aspect buckets: sizes, assignment, cover-resize + crop, single-bucket seeded batches."""

from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.buckets import BucketBatcher, assign_bucket, bucket_set, resize_and_crop
from sd35hub.data.sources import open_samples


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_bucket_sizes_budget_and_aspects(resolution: int) -> None:
    buckets = bucket_set(resolution)
    assert buckets[0] == (resolution, resolution)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.9 * resolution**2 <= w * h <= resolution**2  # never above the pixel budget
        assert max(w, h) / min(w, h) <= 2.5
        assert (h, w) in buckets
    if resolution == 1024:
        for expected in [(1152, 896), (1216, 832), (1344, 768), (1536, 640), (640, 1536)]:
            assert expected in buckets
    # any image whose aspect is inside the bucket range is assigned within a bounded log-aspect error
    logs = sorted(math.log(w / h) for w, h in buckets)
    bound = max(b - a for a, b in zip(logs, logs[1:], strict=False)) / 2  # half the widest gap
    if resolution >= 512:
        assert bound < 0.2
    for i in range(201):
        width = int(1000 * math.exp(logs[0] + i * (logs[-1] - logs[0]) / 200))
        w, h = assign_bucket(width, 1000, buckets)
        assert abs(math.log(w / h) - math.log(width / 1000)) <= bound + 1e-3


def test_resize_and_crop_covers_and_records() -> None:
    image = Image.new("RGB", (1000, 500))
    out, (top, left), original = resize_and_crop(image, (320, 192), "center")
    assert out.size == (320, 192) and original == (500, 1000)
    assert top == 0 and left == (384 - 320) // 2  # resized to 384x192, cropped on the long side
    lefts = {resize_and_crop(image, (320, 192), "random", random.Random(i))[1][1] for i in range(20)}
    assert len(lefts) > 3 and all(0 <= x <= 64 for x in lefts)


def _order(seed: int) -> list[tuple[tuple[int, int], list[str]]]:
    samples = open_samples(DataSpec(source="sample"))
    return [(b.bucket, b.keys) for b in BucketBatcher(samples, bucket_set(256), batch_size=3, buffer_size=8, seed=seed)]


def test_batches_single_bucket_complete_and_seeded() -> None:
    samples = list(open_samples(DataSpec(source="sample")))
    buckets = bucket_set(256)
    batches = list(BucketBatcher(samples, buckets, batch_size=3, buffer_size=8, seed=0, crop="random"))
    seen = [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(s.key for s in samples)  # every sample exactly once
    by_key = {s.key: s for s in samples}
    for b in batches:
        assert 1 <= len(b) <= 3 and b.pixel_values.shape == (len(b), 3, b.bucket[1], b.bucket[0])
        assert -1.0 <= float(b.pixel_values.min()) and float(b.pixel_values.max()) <= 1.0
        assert all(assign_bucket(*by_key[k].image.size, buckets) == b.bucket for k in b.keys)
    assert _order(0) == _order(0)
    assert _order(0) != _order(1)
    # buffer >= buckets * (batch - 1) + 1: a full bucket always exists when the buffer is full
    dropped = list(BucketBatcher(samples, buckets, batch_size=5, buffer_size=16, seed=0, drop_last=True))
    assert all(len(b) == 5 for b in dropped)


@pytest.mark.parametrize("resolution,max_side", [(512, 512), (1024, 512), (768, 640), (1024, 3072), (128, 512), (64, 64)])
def test_bounded_buckets_never_exceed_the_base_models_side(resolution: int, max_side: int) -> None:
    from sd35hub.data.buckets import bounded_buckets

    got, buckets, notes = bounded_buckets(resolution, max_side)
    assert got == min(resolution, max_side // 64 * 64)
    assert buckets and buckets[0] == (got, got)
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert max(w, h) <= max_side and w % 64 == 0 and h % 64 == 0
        assert max(w, h) / min(w, h) <= 2.5
    unbounded = bucket_set(resolution)
    changed = any(max(b) > max_side for b in unbounded)
    assert bool(notes) == changed  # a note exactly when something was clamped
    if resolution > max_side:
        assert f"data.resolution={resolution}" in notes[0] and f"{got} px" in notes[0]
    if not changed:
        assert buckets == unbounded


def test_bounded_buckets_keep_wide_and_tall_shapes_for_the_tiny_model() -> None:
    from sd35hub.data.buckets import bounded_buckets

    _, buckets, notes = bounded_buckets(512, 512)  # the tiny model: 32 patches x 2 x 8 px
    assert (512, 320) in buckets and (320, 512) in buckets  # 640x384 clamped, aspect ~kept
    assert "640x384->512x320" in notes[-1]
    assert assign_bucket(640, 384, buckets) == (512, 320)


def test_bounded_buckets_without_bound_is_the_plain_set() -> None:
    from sd35hub.data.buckets import bounded_buckets

    assert bounded_buckets(1024, None) == (1024, bucket_set(1024), [])
    with pytest.raises(ValueError, match="below the smallest bucket"):
        bounded_buckets(512, 32)
