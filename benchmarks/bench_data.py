"""CPU data-pipeline benchmark: decode + bucket + resize throughput, and cache read rate.

    .venv/bin/python benchmarks/bench_data.py [--n 200] [--workdir /tmp/sd35hub-bench-data]

Generates N ~1024-px images (half JPEG, half PNG, mixed aspect ratios, noisy content so they do
not compress to nothing), streams them through sources -> BucketBatcher at resolution 1024, then
writes a synthetic cache with SD3.5-sized tensors (latents 16 x h/8 x w/8 fp32 mean + std,
prompt_embeds 154 x 4096 bf16, pooled 2048 bf16) and times CachedBatches.load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.buckets import BucketBatcher, assign_bucket, bucket_set
from sd35hub.data.cache import CachedBatches, _atomic_save, entry_id
from sd35hub.data.cache_index import CACHE_FORMAT, INDEX_FILE, CacheEntry, CacheIndex
from sd35hub.data.sources import open_samples

SIZES = [(1024, 1024), (1216, 832), (832, 1216), (1344, 768), (1100, 900), (1600, 1000)]


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        # smooth gradient + mild noise: photo-like file sizes (JPEG ~150-300 KB, PNG ~1-2 MB)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h)) + i % 100], -1)
        pixels = np.clip(base + rng.integers(0, 24, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if i % 2:
            image.save(folder / f"{i:04d}.png", compress_level=1)
        else:
            image.save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"a benchmark picture number {i}")


def bench_pipeline(folder: Path) -> dict[str, float]:
    spec = DataSpec(source=str(folder), resolution=1024)
    start = time.perf_counter()
    count = sum(len(b) for b in BucketBatcher(open_samples(spec), bucket_set(1024), 4, 64, seed=0))
    seconds = time.perf_counter() - start
    return {"samples": count, "seconds": round(seconds, 2), "samples_per_s": round(count / seconds, 1)}


def bench_cache_read(folder: Path, n: int, batch_size: int = 4) -> dict[str, float]:
    buckets = bucket_set(1024)
    entries, tensors, shard_no = [], {}, 0
    for i in range(n):
        w, h = assign_bucket(*SIZES[i % len(SIZES)], buckets)
        eid = entry_id(f"{i}", "c", (0, 0), (w, h), (h, w), "bench", {})
        for name, shape, dtype in [("latents_mean", (16, h // 8, w // 8), torch.float32),
                                   ("latents_std", (16, h // 8, w // 8), torch.float32),
                                   ("prompt_embeds", (154, 4096), torch.bfloat16),
                                   ("pooled_prompt_embeds", (2048,), torch.bfloat16)]:
            tensors[f"{eid}/{name}"] = torch.randn(shape).to(dtype)
        entries.append(CacheEntry(eid, f"k{i}", (w, h), f"shard-{shard_no}.safetensors"))
        if len(tensors) >= 4 * 64 or i == n - 1:
            ids = sorted({k.split("/")[0] for k in tensors})
            _atomic_save(tensors, folder / f"shard-{shard_no}.safetensors", {"entries": json.dumps(ids)})
            tensors, shard_no = {}, shard_no + 1
    _atomic_save({"prompt_embeds": torch.zeros(1, 154, 4096), "pooled_prompt_embeds": torch.zeros(1, 2048)},
                 folder / "empty.safetensors", {"format": CACHE_FORMAT})
    index = CacheIndex(folder, "bench", {}, 0.0609, 1.5305, entries, "empty.safetensors")
    (folder / INDEX_FILE).write_text(json.dumps(index.to_json()))
    batches = CachedBatches(folder, batch_size=batch_size, seed=0)
    refs = batches.epoch_batches(0)
    nbytes, start = 0, time.perf_counter()
    for ref in refs:
        batch = batches.load(ref, generator=torch.Generator().manual_seed(0), sample=True)
        nbytes += sum(batch[k].numel() * batch[k].element_size() for k in
                      ("latents_mean", "latents_std", "prompt_embeds", "pooled_prompt_embeds"))
    seconds = time.perf_counter() - start
    return {"batches": len(refs), "batch_size": batch_size, "batches_per_s": round(len(refs) / seconds, 1),
            "MB_per_s": round(nbytes / seconds / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd35hub-bench-data"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    make_images(args.workdir / "images", args.n)
    print("decode + bucket + resize (1024):", bench_pipeline(args.workdir / "images"))
    (args.workdir / "cache").mkdir()
    print("cache read (SD3.5-sized entries):", bench_cache_read(args.workdir / "cache", args.n))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
