"""Where the latent + embedding cache lives by default, and the keys that decide when it may be reused.

    data_cache_root()                 $SD35HUB_DATA_CACHE, else <default_cache_dir()>/data ($SD35HUB_CACHE)
    data_cache_dir(trainer)           data.cache_dir when set, else <root>/<source>-<folder key>
    warm_key(trainer, prompts)        the key of one complete build: reuse it without reading an image

Two levels, so a later run in a fresh output folder encodes nothing it has encoded before:

- The **folder key** covers what changes every cached tensor: the cache format, the dataset's identity
  (the resolved folder / files / Hub id, split, columns), the base's VAE + text encoders + tokenizers
  (a Hub snapshot's commit; for a local folder every file's path, size and mtime), the encoder settings
  (dtype, data.max_sequence_length, drop_t5, the T5 mode of the memory plan, T5 padding mask), the
  resolution and crop, masks, flips and the longest side of the base. Inside a folder every entry is
  keyed by its image bytes, caption, crop and bucket (sd35hub.data.cache.entry_id), so a changed image
  or caption is encoded again and an unchanged one never is.
- The **warm key** adds what the sample stream depends on: the dataset's file fingerprints (path, size,
  mtime of every file of a local source; the Hub dataset's commit), every caption and filter setting,
  the seed, the batch size and the validation prompts. When ``warm-<key>.json`` of a complete build is in
  the folder and every file it names checks out, the trainer reads no image and loads no encoder;
  anything else (a changed file, a missing or unreadable shard) falls back to the full build, which
  re-encodes only what is missing and says so in the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from sd35hub.config import DataSpec
from sd35hub.paths import default_cache_dir

DATA_CACHE_ENV = "SD35HUB_DATA_CACHE"
KEY_VERSION = "1"  # bump when the key's contents change meaning
# what the cached tensors come from: the encoders and tokenizers, and the transformer (it renders missing class images)
CACHE_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                    "tokenizer_3", "transformer")  # fmt: skip
# DataSpec fields that do not change what the cache build reads or writes (CachedBatches / the loss use them)
_NOT_STREAM = {"cache_dir", "holdout", "caption_dropout", "partial_batches", "repeats", "class_prompt", "class_data",
               "num_class_images", "unmasked_weight"}  # fmt: skip


def data_cache_root() -> Path:
    """$SD35HUB_DATA_CACHE, else the data/ folder of sd35hub's user cache ($SD35HUB_CACHE or ~/.cache/sd35hub)."""
    env = os.environ.get(DATA_CACHE_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / "data"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _files(folder: Path) -> list[list[Any]]:
    rows = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            rows.append([path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns])
    return rows


_HUB_MEMO: dict[tuple[Any, ...], tuple[float, str | None]] = {}
HUB_MEMO_S = 600.0  # a Hub commit looked up within this many seconds is not asked again (one run asks 3-4 times)


def _hub_memo(key: tuple[Any, ...], look_up: Any) -> str | None:
    import time

    hit = _HUB_MEMO.get(key)
    if hit is not None and time.monotonic() - hit[0] < HUB_MEMO_S:
        return hit[1]
    value = look_up()
    _HUB_MEMO[key] = (time.monotonic(), value)
    return value


def model_fingerprint(name: str, revision: str | None, components: tuple[str, ...]) -> str:
    """What identifies ``components`` of a base: a Hub snapshot's commit (its files are content-addressed),
    or for a local folder (and "tiny") the path, size and mtime of every file of those components."""
    from sd35hub.models.locate import model_dir, resolve_model

    ref = resolve_model(name, revision)
    if ref.is_hub:  # a snapshot folder named by its commit (every file of the repo at that commit)
        commit = _hub_memo(("model", ref.name, revision), lambda: model_dir(ref, components, configs_only=True).name)
        return f"hub:{ref.name}@{commit}"
    folder = Path(ref.local_path)
    rows = [[c, _files(folder / c)] for c in components if (folder / c).is_dir()]
    index = folder / "model_index.json"
    if index.is_file():
        rows.append(["model_index.json", index.stat().st_size, index.stat().st_mtime_ns])
    return f"local:{folder}:{_digest(rows)[:32]}"


def source_identity(spec: DataSpec) -> dict[str, Any]:
    from sd35hub.data.sources import resolve_source

    src = resolve_source(spec.source)
    location = src.location if src.kind == "hub" else str(Path(src.location).resolve())
    return {"kind": src.kind, "location": location, "files": [str(Path(f).resolve()) for f in src.files],
            "split": spec.split if src.kind == "hub" else None, "image_column": spec.image_column,
            "caption_column": spec.caption_column}  # fmt: skip


def dataset_fingerprint(spec: DataSpec, token: str | bool | None = None) -> str | None:
    """The dataset's content as far as it can be known without reading it: every file's path, size and
    mtime for a local source; the Hub dataset's current commit (one metadata request). None: unknown
    (the Hub did not answer), so no build may be reused without reading the dataset."""
    from sd35hub.data.sources import resolve_source

    src = resolve_source(spec.source)
    if src.kind == "hub":
        def look_up() -> str | None:
            try:
                from huggingface_hub import HfApi

                return HfApi().dataset_info(src.location, token=token, files_metadata=False).sha
            except Exception:  # noqa: BLE001 - offline, unreachable, gated: the full build reads (and reports) it
                return None

        sha = _hub_memo(("dataset", src.location, spec.split), look_up)
        return f"hub:{src.location}@{sha}" if sha else None
    if src.kind == "folder":
        return _digest(_files(Path(src.location)))
    rows = []
    for f in src.files:
        st = Path(f).stat()
        rows.append([str(f), st.st_size, st.st_mtime_ns])
    return _digest(rows)


def t5_mode(trainer: Any) -> str:
    """How the captions' T5 runs: dropped | gpu | gpu-int8 | gpu-nf4 | cpu (the memory plan's choice)."""
    cfg, plan = trainer.config, getattr(trainer, "plan", None)
    t5 = "dropped" if cfg.model.drop_t5 else (plan.t5 if plan is not None and plan.t5 != "none" else "gpu")
    if trainer.device.type != "cuda" and t5 != "dropped":
        t5 = "gpu"  # on a CPU run the "device" is the CPU
    return t5


def folder_key(trainer: Any) -> dict[str, Any]:
    from sd35hub.data.cache import cache_settings
    from sd35hub.data.cache_index import CACHE_FORMAT

    cfg = trainer.config
    t5 = t5_mode(trainer)
    return {
        "format": CACHE_FORMAT, "key": KEY_VERSION, "source": source_identity(cfg.data),
        "model": model_fingerprint(cfg.model.name, cfg.model.revision, CACHE_COMPONENTS), "model_id": cfg.model.name,
        "settings": cache_settings(cfg.data, drop_t5=t5 == "dropped", dtype=trainer.weight_dtype), "t5": t5,
        "max_side": trainer.info.max_resolution,
    }  # fmt: skip


def _slug(spec: DataSpec) -> str:
    name = spec.source.rstrip("/").replace("\\", "/").split("/")[-1] or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40].strip("._") or "data"


def data_cache_dir(trainer: Any) -> Path:
    """data.cache_dir when set; else <data_cache_root()>/<source name>-<folder key> (see the module doc)."""
    cfg = trainer.config
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    trainer.cache_folder_key = key = folder_key(trainer)
    return data_cache_root() / f"{_slug(cfg.data)}-{_digest(key)[:20]}"


def warm_key(trainer: Any, prompts: list[str]) -> str | None:
    """The key of a complete build for this run's stream (None: the dataset's content cannot be known
    without reading it). See the module doc."""
    import dataclasses

    cfg = trainer.config
    fingerprint = dataset_fingerprint(cfg.data)
    if fingerprint is None:
        return None
    key = getattr(trainer, "cache_folder_key", None) or folder_key(trainer)
    stream = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _NOT_STREAM}
    return _digest({"folder": key, "dataset": fingerprint, "stream": stream, "seed": cfg.train.seed,
                    "batch_size": cfg.train.batch_size, "prompts": list(prompts)})[:32]  # fmt: skip


def checked_dataset(spec: DataSpec, *, seed: int, check: Any, default_prompts: Any, log: Any = None) -> list[str]:
    """``check()`` (sd35hub.data.sources.check_dataset) and ``default_prompts()`` (the first captions), or
    what they gave for the same dataset content (dataset_fingerprint) and stream settings in an earlier
    run: a Hub dataset is then not streamed again just to be checked."""
    import dataclasses

    from sd35hub.paths import atomic_write_text

    fingerprint = dataset_fingerprint(spec)
    path = None
    if fingerprint is not None:
        stream = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_STREAM}
        key = {"key": KEY_VERSION, "source": source_identity(spec), "dataset": fingerprint, "stream": stream, "seed": seed}
        path = data_cache_root() / "checks" / f"{_digest(key)[:32]}.json"
        try:
            raw = json.loads(path.read_text())
            if raw.get("key") == json.loads(json.dumps(key, default=str)):
                if log is not None:
                    log("dataset check: unchanged since an earlier run's check (not read again)")
                return list(raw["default_prompts"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    check()
    prompts = list(default_prompts())
    if path is not None:
        try:
            atomic_write_text(path, json.dumps({"key": key, "default_prompts": prompts}, default=str))
        except OSError:
            pass
    return prompts
