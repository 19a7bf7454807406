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

import contextlib
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
    FLIP_FIELDS,
    INDEX_FILE,
    MASK_FIELD,
    BatchRef,
    CachedBatches,
    CacheEntry,
    CacheIndex,
    sample_latents,
)
from sd35hub.data.sources import SampleStream, no_usable_message
from sd35hub.errors import DatasetError

if TYPE_CHECKING:
    import torch

__all__ = ["BatchRef", "CacheIndex", "CachedBatches", "build_cache", "encode_batch", "free_encoders", "sample_latents"]

SHARD_MAX_ENTRIES = 256
SHARD_MAX_BYTES = 256 * 1024**2


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

    tmp = _tmp_name(path)
    from sd35hub.diskspace import tensor_bytes, writing

    with writing(path, needed=tensor_bytes(tensors)):
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (full disk) leaves no partial shard


def scan_shards(folder: Path, log: Any = None) -> dict[str, str]:
    """entry id -> shard file, for every complete shard; stale *.tmp leftovers are deleted (fresh ones
    may belong to another process writing into a shared cache, and are never read either way). An
    unreadable shard (truncated, overwritten) is deleted, said in ``log``, and its entries are encoded again."""
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
        except Exception as exc:  # noqa: BLE001 - an unreadable shard is rebuilt, not fatal
            if log is not None:
                log(f"data cache: {shard.name} in {folder} is unreadable ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); deleted, its entries are encoded again")
            shard.unlink(missing_ok=True)
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


def as_encoders(encoders: Any, *, device: Any, dtype: torch.dtype, max_sequence_length: int, batch_size: int) -> Any:
    """A StableDiffusion3Pipeline becomes PipelineEncoders; PhasedEncoders (sd35hub.data.encode) pass through."""
    if hasattr(encoders, "encode_texts"):
        return encoders
    from sd35hub.data.encode import PipelineEncoders

    return PipelineEncoders(encoders, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                            batch_size=max(batch_size, 1))


def prompts_file(cache_dir: Path, model_id: str, settings: dict[str, Any], prompts: list[str]) -> Path:
    digest = hashlib.sha256(json.dumps([model_id, settings, prompts], sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"prompts-{digest}.safetensors"


def cached_prompts(index: CacheIndex, prompts: list[str]) -> dict[str, torch.Tensor]:
    """prompt_embeds [n, S, D] / pooled_prompt_embeds [n, P] of ``prompts`` encoded by build_cache(prompts=...)."""
    from safetensors.torch import load_file

    path = prompts_file(index.path, index.model_id, index.settings, list(prompts))
    if not path.is_file():
        raise DatasetError(f"The cache in {index.path} has no embeddings of these validation prompts; rebuild it.")
    return load_file(str(path))


def cache_settings(spec: DataSpec, *, drop_t5: bool, dtype: torch.dtype) -> dict[str, Any]:
    """The encoder and image settings every entry id covers (and the index records)."""
    settings = {"max_sequence_length": spec.max_sequence_length, "drop_t5": bool(drop_t5),
                "dtype": str(dtype).replace("torch.", ""), "resolution": spec.resolution, "crop": spec.crop}
    if spec.masked_loss:  # entries carry a latent-grid loss mask (sd35hub.data.masks); keys unchanged when off
        settings["masked_loss"] = True
    if spec.mask_t5_padding:  # T5 padding positions zeroed (sd35hub.models.t5mask); keys unchanged when off
        settings["mask_t5_padding"] = True
    if spec.random_flip:  # entries also carry the mirrored image's posterior (one more VAE pass each)
        settings["random_flip"] = True
    return settings


WARM_PREFIX = "warm-"


def _warm_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{WARM_PREFIX}{key}.json"


def _file_record(path: Path) -> list[Any]:
    return [path.name, path.stat().st_size]


def load_warm(cache_dir: Path, key: str, prompts: list[str] | tuple[str, ...], log: Any = None) -> CacheIndex | None:
    """The index of a complete earlier build with this warm key (sd35hub.data.cache_key), after checking
    every file it names (present, the recorded size, a readable header listing its entries); None when
    there is none or anything is off (said in ``log``: the caller rebuilds, re-encoding only what is missing)."""
    from safetensors import safe_open

    path = _warm_path(cache_dir, key)
    if not path.is_file():
        return None
    say = log or (lambda line: None)
    try:
        raw = json.loads(path.read_text())
        if raw.get("warm_key") != key or raw.get("format") != CACHE_FORMAT:
            raise ValueError("written for another key or cache format")
        index = CacheIndex.from_json(Path(cache_dir), raw["index"])
        if list(raw.get("prompts", [])) != list(prompts):
            raise ValueError("validation prompts differ")
        files = {name: size for name, size in raw["files"]}
        need_prompts = [prompts_file(cache_dir, index.model_id, index.settings, list(prompts)).name] if prompts else []
        for name in {e.shard for e in index.entries} | {index.empty_prompt, *need_prompts}:
            file = Path(cache_dir) / name
            if not file.is_file():
                raise ValueError(f"{name} is missing")
            if name in files and file.stat().st_size != files[name]:
                raise ValueError(f"{name} has {file.stat().st_size} bytes, not the {files[name]} written")
            with safe_open(str(file), framework="pt") as handle:
                listed = set(json.loads((handle.metadata() or {}).get("entries", "[]")))
            wanted = {e.id for e in index.entries if e.shard == name}
            if not wanted <= listed:
                raise ValueError(f"{name} lacks {len(wanted - listed)} of its entries")
    except Exception as exc:  # noqa: BLE001 - anything off: rebuild (the build checks every shard again)
        say(f"data cache: the complete build {path.name} in {cache_dir} does not check out ({exc}); rebuilding what is missing")
        return None
    index.encoded, index.reused = 0, True
    from sd35hub.paths import atomic_write_text

    if not (Path(cache_dir) / INDEX_FILE).is_file() or CacheIndex.load(Path(cache_dir)).to_json() != index.to_json():
        atomic_write_text(Path(cache_dir) / INDEX_FILE, json.dumps(index.to_json(), indent=1))  # what other ranks read
    return index


def _write_warm(cache_dir: Path, key: str, index: CacheIndex, prompts: list[str] | tuple[str, ...]) -> None:
    from sd35hub.paths import atomic_write_text

    names = {e.shard for e in index.entries} | {index.empty_prompt}
    if prompts:
        names.add(prompts_file(cache_dir, index.model_id, index.settings, list(prompts)).name)
    files = [_file_record(Path(cache_dir) / name) for name in sorted(names)]
    atomic_write_text(_warm_path(cache_dir, key), json.dumps(
        {"format": CACHE_FORMAT, "warm_key": key, "prompts": list(prompts), "files": files, "index": index.to_json()}))


@contextlib.contextmanager
def build_lock(cache_dir: Path, log: Any = None) -> Any:
    """One builder at a time per cache folder (an advisory lock on <cache_dir>/.lock; other runs wait).
    Where the file system has no locks the build goes on without (each file is still written atomically)."""
    import fcntl

    handle = open(Path(cache_dir) / ".lock", "a+")  # noqa: SIM115 - closed below
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"data cache: another run is building {cache_dir}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system (some network mounts)
            pass
        yield
    finally:
        handle.close()  # releases the lock


def build_cache(spec: DataSpec, pipe: Any, cache_dir: Path, *, model_id: str, batch_size: int,
                device: str | torch.device, dtype: torch.dtype, seed: int, progress: bool = True,
                token: str | bool | None = None, shard_size: int = SHARD_MAX_ENTRIES,
                prompts: list[str] | tuple[str, ...] = (), max_side: int | None = None,
                warm_key: str | None = None, log: Any = None) -> CacheIndex:
    """:func:`_build_cache` under the folder's build lock. With ``warm_key`` (sd35hub.data.cache_key) a
    complete earlier build of the same key is reused as it is (nothing read, nothing loaded) after its
    files check out, and a new build records itself under that key."""
    cache_dir = Path(cache_dir)
    if warm_key:
        index = load_warm(cache_dir, warm_key, prompts, log)
        if index is not None:
            return index
    cache_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(cache_dir, log):
        if warm_key:  # another run may have built it while this one waited
            index = load_warm(cache_dir, warm_key, prompts)
            if index is not None:
                return index
        index = _build_cache(spec, pipe, cache_dir, model_id=model_id, batch_size=batch_size, device=device,
                             dtype=dtype, seed=seed, progress=progress, token=token, shard_size=shard_size,
                             prompts=prompts, max_side=max_side, log=log)  # fmt: skip
        if warm_key:
            _write_warm(cache_dir, warm_key, index, prompts)
    return index


def _build_cache(spec: DataSpec, pipe: Any, cache_dir: Path, *, model_id: str, batch_size: int,
                 device: str | torch.device, dtype: torch.dtype, seed: int, progress: bool = True,
                 token: str | bool | None = None, shard_size: int = SHARD_MAX_ENTRIES,
                 prompts: list[str] | tuple[str, ...] = (), max_side: int | None = None, log: Any = None) -> CacheIndex:
    """Stream ``spec``'s samples through buckets and the encoders into ``cache_dir``; see the module doc.
    ``max_side``: the base model's largest image side (ModelInfo.max_resolution); longer buckets are clamped.

    ``pipe``: a StableDiffusion3Pipeline (every encoder loaded) or sd35hub.data.encode.PhasedEncoders
    (each encoder loaded for its phase only). Phases: (1) the VAE over the stream, latents staged;
    (2) the text encoders over the captions of new entries, the empty caption and ``prompts``
    (validation prompts: read back with :func:`cached_prompts`); (3) staged latents + embeddings
    become the cache shards. Nothing is loaded when every entry and prompt is cached already."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    encoders = as_encoders(pipe, device=device, dtype=dtype, max_sequence_length=spec.max_sequence_length,
                           batch_size=batch_size)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = cache_settings(spec, drop_t5=bool(encoders.drop_t5), dtype=dtype)
    if spec.mask_t5_padding:  # T5 padding positions zeroed (sd35hub.models.t5mask); keys unchanged when off
        from sd35hub.models.t5mask import install_t5_padding_mask

        if hasattr(pipe, "_get_t5_prompt_embeds"):  # a whole pipeline (prior preservation, `data cache`)
            install_t5_padding_mask(pipe)
        encoders.mask_t5_padding = True  # PhasedEncoders: applied to its T5 stage
    existing = scan_shards(cache_dir, log)
    stage = cache_dir / "staging"  # latents of entries whose embeddings are not cached yet (survives a crash)
    stage.mkdir(exist_ok=True)
    staged_before = scan_shards(stage, log)
    staged = _ShardWriter(stage, shard_size, SHARD_MAX_BYTES)
    stream = SampleStream(spec, seed=seed, token=token)
    batcher = BucketBatcher(stream, bounded_buckets(spec.resolution, max_side)[1], batch_size, spec.buffer_size, seed,
                            spec.crop)
    rows: list[tuple[str, str, tuple[int, int], str]] = []  # (id, key, bucket, caption) in stream order
    pending: set[str] = set()  # entry ids of this stream that need embeddings
    bar = tqdm(desc="caching latents", unit="img", disable=not progress)
    text_dir = stage / f"text-{os.getpid()}-{os.urandom(3).hex()}"
    encoded = 0
    try:
        with contextlib.ExitStack() as stack:
            encode_images = None
            for batch in batcher:
                ids = [entry_id(batch.content_hashes[i], batch.captions[i], batch.crop_coords[i], batch.bucket,
                                batch.original_sizes[i], model_id, settings) for i in range(len(batch))]
                pending.update(eid for eid in ids if eid not in existing)
                todo = [i for i, eid in enumerate(ids) if eid not in existing and eid not in staged_before
                        and eid not in staged.ids]  # fmt: skip
                if todo:
                    if encode_images is None:  # the VAE loads only when something needs encoding
                        encode_images = stack.enter_context(encoders.image_encoder())
                    mean, std = encode_images(batch.pixel_values[todo])
                    masks = None
                    if spec.masked_loss:
                        from sd35hub.data.masks import latent_mask

                        given = batch.masks[todo] if batch.masks is not None else None
                        masks = latent_mask(given, tuple(mean.shape[-2:]), len(todo))
                    flips = encode_images(batch.pixel_values[todo].flip(-1)) if spec.random_flip else None
                    for row, i in enumerate(todo):
                        staged_before.update(staged.add(ids[i], {
                            "latents_mean": mean[row].to(dtype).cpu(), "latents_std": std[row].to(dtype).cpu(),
                            "caption": torch.tensor(list(batch.captions[i].encode()), dtype=torch.uint8),
                            **({MASK_FIELD: masks[row]} if masks is not None else {}),
                            **({FLIP_FIELDS[0]: flips[0][row].to(dtype).cpu(), FLIP_FIELDS[1]: flips[1][row].to(dtype).cpu()}
                               if flips is not None else {}),
                        }))  # fmt: skip
                    encoded += len(todo)
                rows.extend((eid, key, batch.bucket, caption)
                            for eid, key, caption in zip(ids, batch.keys, batch.captions, strict=True))
                bar.update(len(batch))
        bar.close()
        staged_before.update(staged.flush())
        if stream.stats.usable == 0:
            raise DatasetError(no_usable_message(spec, stream.stats))
        vae_config = encoders.vae_config  # (PhasedEncoders: read from vae/config.json, no weights)

        settings_hash = hashlib.sha256(json.dumps([model_id, settings], sort_keys=True).encode()).hexdigest()[:16]
        empty_name = f"empty_prompt-{settings_hash}.safetensors"
        prompt_path = prompts_file(cache_dir, model_id, settings, list(prompts))
        shards = sorted({staged_before[eid] for eid in pending if eid in staged_before})
        captions: dict[str, str] = {}
        for shard in shards:
            from safetensors import safe_open

            with safe_open(str(stage / shard), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    eid, _, field_name = key.partition("/")
                    if field_name == "caption" and eid in pending:
                        captions[eid] = bytes(handle.get_tensor(key).tolist()).decode()
        texts = sorted(set(captions.values()))
        extra = [""] if not (cache_dir / empty_name).is_file() else []
        want_prompts = bool(prompts) and not prompt_path.is_file()
        all_texts = texts + [t for t in extra + (list(prompts) if want_prompts else []) if t not in texts]
        position = {t: i for i, t in enumerate(all_texts)}
        if all_texts:
            store = encoders.encode_texts(all_texts, text_dir)
            if extra:
                _atomic_save(store.many([position[""]]), cache_dir / empty_name, {"format": CACHE_FORMAT})
            if want_prompts:
                _atomic_save(store.many([position[t] for t in prompts]), prompt_path, {"format": CACHE_FORMAT})
            writer = _ShardWriter(cache_dir, shard_size, SHARD_MAX_BYTES)
            for shard in shards:  # staged latents + embeddings -> cache shards
                latents = load_file(str(stage / shard))
                for eid in sorted(e for e in captions if staged_before[e] == shard):
                    prompt_embeds, pooled = store.get(position[captions[eid]])
                    entry = {"latents_mean": latents[f"{eid}/latents_mean"], "latents_std": latents[f"{eid}/latents_std"],
                             "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
                    if spec.masked_loss:
                        entry[MASK_FIELD] = latents[f"{eid}/{MASK_FIELD}"]
                    if spec.random_flip:  # the mirrored image's posterior (data.random_flip)
                        entry.update({name: latents[f"{eid}/{name}"] for name in FLIP_FIELDS})
                    existing.update(writer.add(eid, entry))
            existing.update(writer.flush())
            for shard in shards:  # a staged shard goes once every entry in it is final
                if all(eid in existing for eid, name in staged_before.items() if name == shard):
                    (stage / shard).unlink(missing_ok=True)
    finally:
        bar.close()
        shutil.rmtree(text_dir, ignore_errors=True)

    index = CacheIndex(
        path=cache_dir, model_id=model_id, settings=settings,
        shift_factor=float(_factor(vae_config, "shift_factor", 0.0)),
        scaling_factor=float(_factor(vae_config, "scaling_factor", 1.0)),
        entries=[CacheEntry(eid, key, bucket, existing[eid], caption) for eid, key, bucket, caption in rows],
        empty_prompt=empty_name, stats=stream.stats.as_dict(), encoded=encoded,
    )
    from sd35hub.paths import atomic_write_text

    atomic_write_text(cache_dir / INDEX_FILE, json.dumps(index.to_json(), indent=1))
    return index


def _factor(config: Any, name: str, default: float) -> float:
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return value if value is not None else default
