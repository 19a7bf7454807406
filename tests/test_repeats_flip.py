"""data.repeats and data.random_flip: repeated samples per epoch, and exact flips (the mirrored image's own
VAE posterior is cached; a flipped sample trains on it, chosen per (seed, epoch, batch, row))."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.cache import CachedBatches, build_cache
from sd35hub.models import tiny


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny.tiny_model_path())


def _folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        image = Image.new("RGB", (96, 96), (250, 250, 250))
        image.paste((i * 40 % 256, 30, 200), (0, 0, 40, 96))  # a bar on the left: mirroring matters
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        (root / f"{i:02d}.png").write_bytes(buffer.getvalue())
    return root


def _build(spec: DataSpec, pipe, cache: Path):
    return build_cache(spec, pipe, cache, model_id="tiny", batch_size=2, device="cpu", dtype=torch.float32, seed=0,
                       progress=False)


def test_flipped_samples_train_on_the_mirrored_images_posterior(tmp_path, pipe):
    spec = DataSpec(source=str(_folder(tmp_path / "d")), resolution=64, min_size=64, random_flip=True)
    index = _build(spec, pipe, tmp_path / "cache")
    assert index.settings["random_flip"] is True
    batches = CachedBatches(index, batch_size=2, seed=3)
    flips, rows = [], 0
    for epoch in range(3):
        for ref in batches.epoch_batches(epoch):
            batch = batches.load(ref)
            for row, position in enumerate(ref.entries):
                entry = index.entries[position]
                stored = batches.reader.entry(entry.shard, entry.id, ("latents_mean", "latents_mean_flip"))
                want = stored["latents_mean_flip"] if batch["flipped"][row] else stored["latents_mean"]
                assert torch.equal(batch["latents_mean"][row], want)
                flips.append(batch["flipped"][row])
                rows += 1
    assert 0.2 < sum(flips) / rows < 0.8  # about half, and both kinds occur
    # the flip is the VAE of the mirrored pixels, not a mirrored latent
    entry = index.entries[0]
    stored = batches.reader.entry(entry.shard, entry.id, ("latents_mean", "latents_mean_flip"))
    assert not torch.equal(stored["latents_mean_flip"], stored["latents_mean"])
    # same seed, same decisions (exact resume); the held-out batch is never flipped
    again = CachedBatches(index, batch_size=2, seed=3)
    assert [again.load(r)["flipped"] for r in again.epoch_batches(1)] == \
        [batches.load(r)["flipped"] for r in batches.epoch_batches(1)]
    held = CachedBatches(index, batch_size=2, seed=3, holdout=2).holdout_batch()
    assert not any(held["flipped"])
    # a flip cache is never served to a run without flips (and the settings of one without are unchanged)
    plain = _build(dataclasses.replace(spec, random_flip=False), pipe, tmp_path / "cache")
    assert "random_flip" not in plain.settings and plain.encoded == 6
    assert {e.id for e in plain.entries}.isdisjoint({e.id for e in index.entries})


def test_repeats_multiply_the_epoch(tmp_path, pipe):
    spec = DataSpec(source=str(_folder(tmp_path / "d")), resolution=64, min_size=64)
    index = _build(spec, pipe, tmp_path / "cache")
    once = CachedBatches(index, batch_size=2, seed=0, holdout=2)
    thrice = CachedBatches(index, batch_size=2, seed=0, holdout=2, repeats=3)
    seen = [i for ref in thrice.epoch_batches(0) for i in ref.entries]
    assert len(seen) == 3 * len(once.train_entries)
    assert all(seen.count(i) == 3 for i in once.train_entries)
    assert not set(seen) & set(once.holdout_entries)
