"""Latent + embedding cache on the embedded tiny SD3.5 model: hits, invalidation, resume, batches."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.cache import CachedBatches, CacheIndex, build_cache, sample_latents
from sd35hub.errors import DatasetError
from sd35hub.models import tiny


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny.tiny_model_path())


def make_folder(root: Path, n: int = 7) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = [(96, 96), (128, 80), (80, 128)][i % 3]
        buffer = io.BytesIO()
        Image.new("RGB", size, (i * 30 % 256, 100, 200 - i * 20)).save(buffer, format="PNG")
        (root / f"{i:02d}.png").write_bytes(buffer.getvalue())
        (root / f"{i:02d}.txt").write_text(f"a picture number {i}")
    return root


class Counting:
    """Counts calls to the pipeline's real encoders (no behaviour changed)."""

    def __init__(self, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompt_calls = self.vae_calls = 0
        real_prompt, real_vae = pipe.encode_prompt, pipe.vae.encode

        def encode_prompt(*args, **kwargs):
            self.prompt_calls += 1
            return real_prompt(*args, **kwargs)

        def vae_encode(*args, **kwargs):
            self.vae_calls += 1
            return real_vae(*args, **kwargs)

        monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
        monkeypatch.setattr(pipe.vae, "encode", vae_encode)


def build(spec: DataSpec, pipe, cache: Path, **kwargs) -> CacheIndex:
    return build_cache(spec, pipe, cache, model_id="tiny", batch_size=2, device="cpu", dtype=torch.float32,
                       seed=0, progress=False, **kwargs)


def test_build_hit_invalidate_and_batches(tmp_path: Path, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "data")
    spec = DataSpec(source=str(data), resolution=128, min_size=64, buffer_size=4)
    cache = tmp_path / "cache"
    first = build(spec, pipe, cache)
    assert first.encoded == 7 and len(first.entries) == 7
    assert first.shift_factor == pytest.approx(tiny.VAE_SHIFT_FACTOR)
    assert first.scaling_factor == pytest.approx(tiny.VAE_SCALING_FACTOR)
    assert first.stats["usable"] == 7

    counter = Counting(pipe, monkeypatch)
    again = build(spec, pipe, cache)
    assert counter.prompt_calls == 0 and counter.vae_calls == 0 and again.encoded == 0
    assert {e.id for e in again.entries} == {e.id for e in first.entries}

    (data / "03.txt").write_text("a different caption")
    changed = build(spec, pipe, cache)
    assert changed.encoded == 1 and counter.vae_calls == 1
    old = {e.key: e.id for e in first.entries}
    new = {e.key: e.id for e in changed.entries}
    assert [k for k in old if old[k] != new[k]] == ["03.png"]

    batches = CachedBatches(cache, batch_size=2, seed=5, holdout=2)
    assert len(batches.train_entries) == 5 and not set(batches.train_entries) & set(batches.holdout_entries)
    refs = batches.epoch_batches(0)
    assert refs == batches.epoch_batches(0) and refs != batches.epoch_batches(1)
    assert batches.num_batches_per_epoch == len(refs)
    loaded_keys = []
    for ref in refs:
        batch = batches.load(ref, generator=torch.Generator().manual_seed(0), sample=True)
        b = len(ref.entries)
        w, h = ref.bucket
        assert batch["latents_mean"].shape == (b, 16, h // 8, w // 8) == batch["latents"].shape
        assert batch["prompt_embeds"].shape == (b, 77 + spec.max_sequence_length, tiny.T5_D_MODEL)
        assert batch["pooled_prompt_embeds"].shape == (b, 2 * tiny.CLIP_PROJECTION)
        loaded_keys += batch["keys"]
    assert sorted(loaded_keys) == sorted(changed.entries[i].key for i in batches.train_entries)
    holdout = batches.holdout_batch()
    assert holdout is not None and set(holdout["keys"]) <= {changed.entries[i].key for i in batches.holdout_entries}
    assert sum(batches.bucket_histogram().values()) == 7

    # the cached embedding equals a fresh encode of the same caption
    entry = next(e for e in changed.entries if e.key == "03.png")
    fresh = pipe.encode_prompt(prompt=["a different caption"], prompt_2=None, prompt_3=None, device="cpu",
                               do_classifier_free_guidance=False, max_sequence_length=spec.max_sequence_length)[0]
    cached = batches.reader.tensor(entry.shard, f"{entry.id}/prompt_embeds")
    torch.testing.assert_close(cached, fresh[0])

    dropping = CachedBatches(cache, batch_size=7, seed=5, holdout=0, caption_dropout=0.5)
    ref = dropping.epoch_batches(0)[0]
    batch = dropping.load(ref)
    empty = dropping.empty_prompt()["prompt_embeds"][0]
    for row, dropped in enumerate(batch["dropped_captions"]):
        assert torch.equal(batch["prompt_embeds"][row], empty) == dropped


def test_interrupted_build_resumes_and_half_written_shards_are_never_read(tmp_path: Path, pipe,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "data", n=6)
    spec = DataSpec(source=str(data), resolution=128, min_size=64, buffer_size=2)
    cache = tmp_path / "cache"
    real_encode = pipe.vae.encode
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash")
        return real_encode(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pipe.vae, "encode", failing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build(spec, pipe, cache, shard_size=2)
    with pytest.raises(DatasetError, match="No complete cache"):
        CacheIndex.load(cache)
    complete = sorted(cache.rglob("shard-*.safetensors"))
    assert complete  # the (staged) shards finished before the crash survive
    crashed = cache / "shard-0000.safetensors.123-abcd.tmp"
    crashed.write_bytes(b"half a shard")  # a crash mid-write, hours ago
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    in_flight = cache / "shard-0001.safetensors.456-ef01.tmp"
    in_flight.write_bytes(b"another machine is writing this")  # shared cache: not ours to delete
    (cache / "shard-ffff.safetensors").write_bytes(b"not a safetensors file")  # foreign junk
    index = build(spec, pipe, cache, shard_size=2)
    assert 0 < index.encoded < 6 and len(index.entries) == 6
    assert not crashed.exists() and in_flight.exists()
    assert not [p for p in cache.glob("*.tmp") if p != in_flight]  # our own temp files were all renamed
    assert "shard-ffff.safetensors" not in {e.shard for e in index.entries}
    batches = CachedBatches(index, batch_size=3, seed=0)
    assert sum(len(batches.load(ref)["keys"]) for ref in batches.epoch_batches(0)) == 6


def test_a_batch_over_many_shards_opens_each_shard_once(tmp_path: Path, pipe) -> None:
    data = make_folder(tmp_path / "data", n=6)
    index = build(DataSpec(source=str(data), resolution=128, min_size=64), pipe, tmp_path / "cache", shard_size=1)
    shards = {e.shard for e in index.entries}
    assert len(shards) == 6  # more shards than the old 4-handle LRU held
    batches = CachedBatches(index, batch_size=6, seed=0)
    (ref,) = batches.epoch_batches(0)
    batch = batches.load(ref)
    assert batches.reader.opened == len(shards)  # not one reopen per field per entry
    batches.load(ref)
    assert batches.reader.opened == len(shards)  # all still open for the next batch
    for row, i in enumerate(ref.entries):
        e = index.entries[i]
        assert torch.equal(batch["prompt_embeds"][row], batches.reader.tensor(e.shard, f"{e.id}/prompt_embeds"))
        assert torch.equal(batch["latents_mean"][row], batches.reader.tensor(e.shard, f"{e.id}/latents_mean"))


def test_sample_latents_formula() -> None:
    mean, std = torch.full((1, 16, 2, 2), 0.5), torch.full((1, 16, 2, 2), 0.1)
    latents = sample_latents(mean, std, torch.Generator().manual_seed(1), 0.0609, 1.5305)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, (mean + std * eps - 0.0609) * 1.5305)


def test_partial_batches_are_filled_kept_or_dropped(tmp_path: Path, pipe) -> None:
    """A bucket's last, short batch of an epoch: "fill" tops it up with other samples of the same bucket
    (every batch the same size, so compiled blocks see one batch size), "keep" leaves it short, "drop"
    skips it; a bucket smaller than one batch stays one short batch under "fill"."""
    data = make_folder(tmp_path / "data", n=7)  # buckets of 3 (square), 2 and 2 samples
    index = build(DataSpec(source=str(data), resolution=256, min_size=64), pipe, tmp_path / "cache")
    by_bucket: dict[tuple[int, int], set[int]] = {}
    for i, e in enumerate(index.entries):
        by_bucket.setdefault(e.bucket, set()).add(i)
    assert sorted(len(v) for v in by_bucket.values()) == [2, 2, 3]

    def epoch(partial: str, batch_size: int, n: int = 0) -> list:
        return CachedBatches(index, batch_size=batch_size, seed=3, partial=partial).epoch_batches(n)

    keep, fill, drop = epoch("keep", 2), epoch("fill", 2), epoch("drop", 2)
    assert sorted(len(r.entries) for r in keep) == [1, 2, 2, 2]
    assert sorted(i for r in keep for i in r.entries) == list(range(7))  # each sample once
    assert [len(r.entries) for r in fill] == [2, 2, 2, 2] and fill == epoch("fill", 2)
    assert {i for r in fill for i in r.entries} == set(range(7))  # nobody left out
    for r in fill:
        assert len(set(r.entries)) == len(r.entries) and set(r.entries) <= by_bucket[r.bucket]
    assert sorted(len(r.entries) for r in drop) == [2, 2, 2] and len({i for r in drop for i in r.entries}) == 6
    assert sorted(len(r.entries) for r in epoch("fill", 3)) == [2, 2, 3]  # 2-sample buckets: too small to fill
    with pytest.raises(ValueError, match="keep, fill, drop"):
        CachedBatches(index, batch_size=2, partial="pad")


@pytest.mark.slow
def test_cache_buckets_fit_the_tiny_transformers_position_grid(tmp_path: Path, pipe) -> None:
    """#15.7: at 512 px the sample set's 640x384 images made a 640 px bucket, which the tiny
    transformer (pos_embed_max_size 32 x patch 2 x 8 = 512 px) refuses after caching."""
    from sd35hub.models.load import model_info

    max_side = model_info("tiny").max_resolution
    assert max_side == 512
    spec = DataSpec(source="sample", resolution=512, max_samples=6, cache_dir=str(tmp_path))
    index = build(spec, pipe, tmp_path / "c", max_side=max_side)
    buckets = {e.bucket for e in index.entries}
    assert all(max(b) <= 512 for b in buckets) and len(buckets) > 1, buckets
    width, height = max(buckets, key=lambda b: b[0] / b[1])
    with torch.no_grad():  # the transformer takes the widest bucket's latents
        out = pipe.transformer(hidden_states=torch.zeros(1, 16, height // 8, width // 8), timestep=torch.tensor([500.0]),
                               encoder_hidden_states=torch.zeros(1, 12, 64), pooled_projections=torch.zeros(1, 64),
                               return_dict=False)[0]
    assert out.shape == (1, 16, height // 8, width // 8)


def test_default_holdout_keeps_every_image_of_a_small_set_and_says_so(tmp_path: Path, pipe) -> None:
    """#15.8: data.holdout defaulted to 2, silently training a 12-image set on 10. Now automatic:
    nothing held out below 50 samples, the validation loss on training samples at fixed noise."""
    from sd35hub.data.cache_index import HOLDOUT_AUTO_MIN, auto_holdout

    assert DataSpec().holdout is None
    assert [auto_holdout(n) for n in (1, 12, HOLDOUT_AUTO_MIN - 1, HOLDOUT_AUTO_MIN, 500, 10**6)] == [0, 0, 0, 2, 10, 16]
    data = make_folder(tmp_path / "data")
    index = build(DataSpec(source=str(data), resolution=128, min_size=64), pipe, tmp_path / "cache")
    auto = CachedBatches(index, batch_size=2, seed=5, holdout=None)
    assert auto.holdout_entries == () and len(auto.train_entries) == 7
    assert auto.validation_source == "training"
    batch = auto.validation_batch()
    assert batch is not None and 1 <= len(batch["keys"]) <= 4
    assert set(batch["keys"]) <= {index.entries[i].key for i in auto.train_entries}
    assert len({tuple(batch["latents_mean"].shape[1:])}) == 1  # one bucket: one tensor shape
    line = auto.describe_holdout()
    assert "held out nothing: all 7 samples train" in line and f"{len(batch['keys'])} training samples" in line

    explicit = CachedBatches(index, batch_size=2, seed=5, holdout=2)
    assert explicit.validation_source == "held-out"
    held_keys = sorted(index.entries[i].key for i in explicit.holdout_entries)
    assert "held out 2 of 7 samples" in explicit.describe_holdout()
    assert all(key in explicit.describe_holdout() for key in held_keys)
    assert set(explicit.validation_batch()["keys"]) <= set(held_keys)
