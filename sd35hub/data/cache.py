"""Precompute VAE latents and text embeddings once, so no encoder runs during training.

    index = build_cache(spec, pipe, Path("output/cache"), model_id="stabilityai/stable-diffusion-3.5-medium",
                        batch_size=4, device="cuda", dtype=torch.bfloat16, seed=42)
    free_encoders(pipe)                                   # text encoders + VAE off the GPU
    batches = CachedBatches(index, batch_size=4, seed=42, holdout=2, caption_dropout=0.1)
    for ref in batches.epoch_batches(epoch)[start_batch:]:
        batch = batches.load(ref, generator=gen, sample=True)   # batch["latents"]: [b, 16, h/8, w/8]

The VAE posterior is stored as mean and std (not one sample), so each epoch draws fresh latents
with :func:`sample_latents`; the VAE's shift and scaling factors are stored in the index.
Entries are keyed by a content hash of (image bytes, caption after tweaks, crop, bucket, model id,
encoder settings: max_sequence_length, drop_t5, dtype): a changed image, caption or setting never
reuses a stale entry, and an unchanged one is never encoded twice. Shards are written to a temp
name and renamed, so an interrupted build resumes from its complete shards; the index is written
last. Memory is bounded: one bucket buffer, one batch on the encoders, one shard being filled.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.config import DataSpec
from sd35hub.data.buckets import BucketBatcher, bounded_buckets
from sd35hub.data.cache_index import (
    CACHE_FORMAT,
    FIELDS,
    INDEX_FILE,
    MASK_FIELD,
    BatchRef,
    CachedBatches,
    CacheEntry,
    CacheIndex,
)
from sd35hub.data.sources import SampleStream, no_usable_message
from sd35hub.errors import DatasetError

if TYPE_CHECKING:
    import torch

__all__ = ["BatchRef", "CacheIndex", "CachedBatches", "build_cache", "encode_batch", "free_encoders", "sample_latents"]

SHARD_MAX_ENTRIES = 256
SHARD_MAX_BYTES = 256 * 1024**2


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None,
                   shift: float, scale: float) -> torch.Tensor:
    """One VAE posterior sample, shifted and scaled like the pipeline does: (mean + std·ε - shift) · scale."""
    import torch

    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift) * scale


def encode_batch(pipe: Any, pixel_values: torch.Tensor, captions: list[str], *, max_sequence_length: int,
                 device: str | torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pipeline's own encoders on one batch (pixel_values [b, 3, h, w] in [-1, 1]).

    Returns latents_mean/latents_std [b, 16, h/8, w/8] (unscaled posterior), prompt_embeds
    [b, 77 + max_sequence_length, joint_dim] and pooled_prompt_embeds [b, pooled_dim], in ``dtype``.
    With ``pipe.text_encoder_3 is None`` (drop_t5) the T5 part is zeros, as in the pipeline.
    """
    import torch

    with torch.no_grad():
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=device,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
        )
        posterior = pipe.vae.encode(pixel_values.to(device=device, dtype=pipe.vae.dtype)).latent_dist
        return {
            "latents_mean": posterior.mean.to(dtype).cpu(),
            "latents_std": posterior.std.to(dtype).cpu(),
            "prompt_embeds": prompt_embeds.to(dtype).cpu(),
            "pooled_prompt_embeds": pooled_prompt_embeds.to(dtype).cpu(),
        }


def free_encoders(pipe: Any, *, delete: bool = False) -> None:
    """Move the text encoders and the VAE to the CPU (or drop them with ``delete=True``) and empty
    the CUDA cache. Keep the VAE (delete=False) if validation images must still be decoded."""
    import torch

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if delete:
            setattr(pipe, name, None)
        else:
            module.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def entry_id(content_hash: str, caption: str, crop: tuple[int, int], bucket: tuple[int, int],
             original: tuple[int, int], model_id: str, settings: dict[str, Any]) -> str:
    payload = {"v": CACHE_FORMAT, "image": content_hash, "caption": caption, "crop": list(crop),
               "bucket": list(bucket), "original": list(original), "model": model_id, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


STALE_TMP_S = 3600  # a *.tmp older than this is a crashed build's leftover, not another writer's work


def _tmp_name(path: Path) -> Path:
    """A temp name of this writer alone: several processes/machines may share one cache folder."""
    return path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from sd35hub.diskspace import tensor_bytes, writing

    tmp = _tmp_name(path)
    with writing(path, needed=tensor_bytes(tensors)):
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (full disk) leaves no partial shard


def scan_shards(folder: Path) -> dict[str, str]:
    """entry id -> shard file, for every complete shard; stale *.tmp leftovers are deleted (fresh ones
    may belong to another process writing into a shared cache, and are never read either way)."""
    import time

    from safetensors import safe_open

    found: dict[str, str] = {}
    for tmp in folder.glob("*.safetensors.*tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
    for shard in sorted(folder.glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                meta = handle.metadata() or {}
            for eid in json.loads(meta.get("entries", "[]")):
                found[eid] = shard.name
        except Exception:  # noqa: BLE001 - an unreadable shard is rebuilt, not fatal
            continue
    return found


class _ShardWriter:
    def __init__(self, folder: Path, max_entries: int, max_bytes: int) -> None:
        self.folder, self.max_entries, self.max_bytes = folder, max_entries, max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.ids: list[str] = []
        self.nbytes = 0

    def add(self, eid: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        for name, tensor in tensors.items():
            self.tensors[f"{eid}/{name}"] = tensor.clone()  # own storage: not a view of the batch
            self.nbytes += tensor.numel() * tensor.element_size()
        self.ids.append(eid)
        return self.flush() if len(self.ids) >= self.max_entries or self.nbytes >= self.max_bytes else {}

    def flush(self) -> dict[str, str]:
        if not self.ids:
            return {}
        name = f"shard-{hashlib.sha256(''.join(self.ids).encode()).hexdigest()[:16]}.safetensors"
        _atomic_save(self.tensors, self.folder / name, {"entries": json.dumps(self.ids), "format": CACHE_FORMAT})
        written = dict.fromkeys(self.ids, name)
        self.tensors, self.ids, self.nbytes = {}, [], 0
        return written


def build_cache(spec: DataSpec, pipe: Any, cache_dir: Path, *, model_id: str, batch_size: int,
                device: str | torch.device, dtype: torch.dtype, seed: int, progress: bool = True,
                token: str | bool | None = None, shard_size: int = SHARD_MAX_ENTRIES,
                max_side: int | None = None) -> CacheIndex:
    """Stream ``spec``'s samples through buckets and the encoders into ``cache_dir``; see the module doc.
    ``max_side``: the base model's largest image side (ModelInfo.max_resolution); longer buckets are clamped."""
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    drop_t5 = getattr(pipe, "text_encoder_3", None) is None
    settings = {"max_sequence_length": spec.max_sequence_length, "drop_t5": drop_t5, "dtype": str(dtype).replace("torch.", ""),
                "resolution": spec.resolution, "crop": spec.crop}
    if spec.masked_loss:  # entries carry a latent-grid loss mask (sd35hub.data.masks); keys unchanged when off
        settings["masked_loss"] = True
    fields = FIELDS + (MASK_FIELD,) if spec.masked_loss else FIELDS
    existing = scan_shards(cache_dir)
    writer = _ShardWriter(cache_dir, shard_size, SHARD_MAX_BYTES)
    stream = SampleStream(spec, seed=seed, token=token)
    batcher = BucketBatcher(stream, bounded_buckets(spec.resolution, max_side)[1], batch_size, spec.buffer_size, seed, spec.crop)
    rows: list[tuple[str, str, tuple[int, int]]] = []  # (id, key, bucket) in stream order
    encoded = 0
    bar = tqdm(desc="caching latents + embeddings", unit="img", disable=not progress)
    for batch in batcher:
        ids = [entry_id(batch.content_hashes[i], batch.captions[i], batch.crop_coords[i], batch.bucket,
                        batch.original_sizes[i], model_id, settings) for i in range(len(batch))]
        todo = [i for i, eid in enumerate(ids) if eid not in existing and eid not in writer.ids]
        if todo:
            out = encode_batch(pipe, batch.pixel_values[todo], [batch.captions[i] for i in todo],
                               max_sequence_length=spec.max_sequence_length, device=device, dtype=dtype)
            if spec.masked_loss:
                from sd35hub.data.masks import latent_mask

                masks = batch.masks[todo] if batch.masks is not None else None
                out[MASK_FIELD] = latent_mask(masks, tuple(out["latents_mean"].shape[-2:]), len(todo))
            for row, i in enumerate(todo):
                existing.update(writer.add(ids[i], {name: out[name][row] for name in fields}))
            encoded += len(todo)
        rows.extend((eid, key, batch.bucket) for eid, key in zip(ids, batch.keys, strict=True))
        bar.update(len(batch))
    bar.close()
    existing.update(writer.flush())
    if stream.stats.usable == 0:
        raise DatasetError(no_usable_message(spec, stream.stats))

    settings_hash = hashlib.sha256(json.dumps([model_id, settings], sort_keys=True).encode()).hexdigest()[:16]
    empty_name = f"empty_prompt-{settings_hash}.safetensors"
    if not (cache_dir / empty_name).is_file():
        import torch

        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=[""], prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=spec.max_sequence_length,
            )
        _atomic_save({"prompt_embeds": prompt_embeds.to(dtype).cpu(), "pooled_prompt_embeds": pooled.to(dtype).cpu()},
                     cache_dir / empty_name, {"format": CACHE_FORMAT})

    vae_config = pipe.vae.config
    index = CacheIndex(
        path=cache_dir, model_id=model_id, settings=settings,
        shift_factor=float(getattr(vae_config, "shift_factor", None) or 0.0),
        scaling_factor=float(getattr(vae_config, "scaling_factor", None) or 1.0),
        entries=[CacheEntry(eid, key, bucket, existing[eid]) for eid, key, bucket in rows],
        empty_prompt=empty_name, stats=stream.stats.as_dict(), encoded=encoded,
    )
    from sd35hub.paths import atomic_write_text

    atomic_write_text(cache_dir / INDEX_FILE, json.dumps(index.to_json(), indent=1))
    return index
