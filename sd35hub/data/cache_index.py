"""Reading the latent + embedding cache: the index, lazy shard access, and per-epoch batches.

Layout of a cache folder (written by :func:`sd35hub.data.cache.build_cache`)::

    shard-<hash>.safetensors      complete shards only (written as *.tmp, then renamed); tensors
                                  "<entry id>/latents_mean" [16, h/8, w/8], ".../latents_std",
                                  ".../prompt_embeds" [77 + T, joint_dim], ".../pooled_prompt_embeds"
                                  [pooled_dim]; metadata "entries" lists what the shard holds
    empty_prompt-<hash>.safetensors   the "" caption's prompt_embeds [1, S, D] and pooled [1, P]
    index.json                    written last: settings, VAE shift/scale, entries -> shard, skip stats

Only entries listed in index.json are ever read, so a half-written or foreign shard is never used.
Resume position for a trainer is (epoch, batch_index): ``epoch_batches(epoch)[batch_index:]``.
"""

from __future__ import annotations

import json
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.data.sources import caption_dropped, stable_seed
from sd35hub.errors import DatasetError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "index.json"
HOLDOUT_AUTO_MIN = 50  # data.holdout=None (auto): below this many samples nothing is held out
VALIDATION_TRAIN_SAMPLES = 4  # nothing held out: the validation loss uses this many training samples
CACHE_FORMAT = "1"
FIELDS = ("latents_mean", "latents_std", "prompt_embeds", "pooled_prompt_embeds")
MASK_FIELD = "mask"  # [1, h/8, w/8] in [0, 1], in caches built with data.masked_loss (sd35hub.data.masks)
FLIP_FIELDS = ("latents_mean_flip", "latents_std_flip")  # the mirrored image's posterior (data.random_flip)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None,
                   shift: float, scale: float) -> torch.Tensor:
    """One VAE posterior sample, shifted and scaled like the pipeline does: (mean + std·ε - shift) · scale."""
    import torch

    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift) * scale


@dataclass(frozen=True)
class CacheEntry:
    id: str  # content hash of (image bytes, caption, crop, bucket, model id, encoder settings)
    key: str  # the sample's stable key
    bucket: tuple[int, int]  # (width, height) in pixels
    shard: str  # file name inside the cache folder
    caption: str | None = None  # the caption it was encoded with (live text encoders re-encode it); None: older index


@dataclass
class CacheIndex:
    path: Path  # the cache folder
    model_id: str
    settings: dict[str, Any]  # max_sequence_length, drop_t5, dtype, resolution, crop
    shift_factor: float  # VAE: latents = (sample - shift_factor) * scaling_factor
    scaling_factor: float
    entries: list[CacheEntry]
    empty_prompt: str  # file with the empty caption's embeddings (caption dropout)
    stats: dict[str, Any] = field(default_factory=dict)  # SkipStats.as_dict() of the build
    encoded: int = 0  # samples encoded by the build that wrote this index (0 = all cached)
    reused: bool = False  # a complete earlier build taken as it was (sd35hub.data.cache.load_warm): nothing read

    @classmethod
    def load(cls, path: Path) -> CacheIndex:
        path = Path(path)
        try:
            raw = json.loads((path / INDEX_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"No complete cache in {path} (missing or unreadable {INDEX_FILE}); build it with "
                "`sd35hub data cache` or let `sd35hub train` build it."
            ) from exc
        if raw.get("format") != CACHE_FORMAT:
            raise DatasetError(f"The cache in {path} has format {raw.get('format')!r}, not {CACHE_FORMAT}; delete it and rebuild.")
        return cls.from_json(path, raw)

    @classmethod
    def from_json(cls, path: Path, raw: dict[str, Any]) -> CacheIndex:
        entries = [CacheEntry(e["id"], e["key"], (e["bucket"][0], e["bucket"][1]), e["shard"], e.get("caption"))
                   for e in raw["entries"]]
        return cls(Path(path), raw["model_id"], raw["settings"], raw["shift_factor"], raw["scaling_factor"], entries,
                   raw["empty_prompt"], raw.get("stats", {}), raw.get("encoded", 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "model_id": self.model_id,
            "settings": self.settings,
            "shift_factor": self.shift_factor,
            "scaling_factor": self.scaling_factor,
            "empty_prompt": self.empty_prompt,
            "stats": self.stats,
            "encoded": self.encoded,
            "entries": [{"id": e.id, "key": e.key, "bucket": list(e.bucket), "shard": e.shard,
                         **({"caption": e.caption} if e.caption is not None else {})} for e in self.entries],
        }

    def bucket_histogram(self) -> dict[str, int]:
        counts = Counter(f"{w}x{h}" for w, h in (e.bucket for e in self.entries))
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def auto_holdout(num_samples: int) -> int:
    """data.holdout=None: nothing below HOLDOUT_AUTO_MIN samples (a 12-image DreamBooth set keeps all
    12); from there 2%, at least 2 and at most 16."""
    return 0 if num_samples < HOLDOUT_AUTO_MIN else min(16, max(2, num_samples // 50))


@dataclass(frozen=True)
class BatchRef:
    epoch: int
    index: int  # position in epoch_batches(epoch): the resume point
    bucket: tuple[int, int]
    entries: tuple[int, ...]  # positions in CacheIndex.entries


class ShardReader:
    """Lazily opened shards (memory-mapped by safetensors); at most ``max_open`` kept open, least
    recently used closed first. An open shard is an mmap and a file descriptor, so 64 is cheap and
    covers the shards a shuffled batch touches (a smaller LRU reopened files on every lookup)."""

    def __init__(self, folder: Path, max_open: int = 64) -> None:
        self.folder = folder
        self.max_open = max_open
        self.opened = 0  # safe_open calls so far (reopens included)
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _handle(self, shard: str) -> Any:
        from safetensors import safe_open

        handle = self._open.get(shard)
        if handle is None:
            handle = safe_open(str(self.folder / shard), framework="pt")
            self.opened += 1
            self._open[shard] = handle
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return handle

    def tensor(self, shard: str, name: str) -> torch.Tensor:
        return self._handle(shard).get_tensor(name)

    def entry(self, shard: str, entry_id: str, fields: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """All ``fields`` of one entry (tensors ``<entry_id>/<field>``) with one shard lookup."""
        handle = self._handle(shard)
        return {name: handle.get_tensor(f"{entry_id}/{name}") for name in fields}


class CachedBatches:
    """Single-bucket training batches over a built cache, shuffled per (seed, epoch).

    ``holdout`` entries (chosen by seed) never appear in training batches; ``holdout_batch()``
    returns them for a validation loss. With ``caption_dropout`` > 0, ``load`` swaps the cached
    empty-caption embeddings into the rows chosen by ``caption_dropped(key, seed, epoch, rate)``.

    ``partial``: what happens to a bucket's last batch of an epoch when fewer than ``batch_size``
    samples are left: "keep" it smaller, "fill" it with other samples of the bucket drawn from its
    earlier batches of the epoch (every batch then has the same size, so compiled blocks see one
    batch size; a bucket smaller than one batch stays a smaller batch), or "drop" it.
    """

    def __init__(self, index: CacheIndex | Path, batch_size: int, seed: int = 0, holdout: int | None = 0,
                 caption_dropout: float = 0.0, partial: str = "keep", repeats: int = 1) -> None:
        self.index = index if isinstance(index, CacheIndex) else CacheIndex.load(Path(index))
        self.batch_size = batch_size
        self.seed = seed
        self.caption_dropout = caption_dropout
        if partial not in ("keep", "fill", "drop"):
            raise ValueError(f"partial batches {partial!r} is not one of keep, fill, drop")
        self.partial = partial
        self.repeats = max(1, repeats)  # data.repeats: each training entry this many times per epoch
        self.reader = ShardReader(self.index.path)
        order = sorted(range(len(self.index.entries)), key=lambda i: self.index.entries[i].key)
        if holdout is None:
            holdout = auto_holdout(len(order))
        holdout = min(holdout, max(len(order) - 1, 0))  # always keep one training sample
        held = set(random.Random(stable_seed("holdout", seed)).sample(order, holdout)) if holdout else set()
        self.holdout_entries = tuple(i for i in order if i in held)
        self.train_entries = tuple(i for i in order if i not in held)
        self._empty: dict[str, torch.Tensor] | None = None

    def epoch_batches(self, epoch: int) -> list[BatchRef]:
        rng = random.Random(stable_seed("epoch", self.seed, epoch))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in self.train_entries:
            by_bucket.setdefault(self.index.entries[i].bucket, []).extend([i] * self.repeats)
        groups: list[tuple[tuple[int, int], tuple[int, ...]]] = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                chunk = tuple(members[start : start + self.batch_size])
                missing = self.batch_size - len(chunk)
                if missing and self.partial == "drop":
                    continue
                if missing and self.partial == "fill" and len(members) >= self.batch_size:
                    chunk += tuple(rng.sample(members[:start], missing))  # seen earlier this epoch
                groups.append((bucket, chunk))
        rng.shuffle(groups)
        return [BatchRef(epoch, n, bucket, chunk) for n, (bucket, chunk) in enumerate(groups)]

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def bucket_histogram(self) -> dict[str, int]:
        return self.index.bucket_histogram()

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The "" caption: prompt_embeds [1, S, D] and pooled_prompt_embeds [1, P]."""
        if self._empty is None:
            from safetensors.torch import load_file

            self._empty = load_file(str(self.index.path / self.index.empty_prompt))
        return self._empty

    def load(self, ref: BatchRef, *, generator: torch.Generator | None = None, sample: bool = False) -> dict[str, Any]:
        """Tensors of one batch: latents_mean/latents_std [b, 16, h/8, w/8], prompt_embeds [b, S, D],
        pooled_prompt_embeds [b, P], keys; with ``sample=True`` also ``latents`` (VAE-sampled,
        shifted and scaled, ready for the flow-matching loss)."""
        return self._load(ref.entries, epoch=ref.epoch, dropout=self.caption_dropout, generator=generator, sample=sample,
                          flips=bool(self.index.settings.get("random_flip")), batch=ref.index)

    @property
    def validation_source(self) -> str:
        """What the validation loss is computed on: "held-out" samples, or (none held out) "training" samples."""
        return "held-out" if self.holdout_entries else "training"

    def validation_entries(self) -> tuple[int, ...]:
        """The held-out samples of the largest holdout bucket; with nothing held out, the first
        VALIDATION_TRAIN_SAMPLES training samples (by key) of the largest training bucket. One
        bucket: one tensor shape."""
        pool = self.holdout_entries or self.train_entries
        if not pool:
            return ()
        buckets = Counter(self.index.entries[i].bucket for i in pool)
        bucket = max(sorted(buckets), key=lambda b: buckets[b])
        chosen = tuple(i for i in pool if self.index.entries[i].bucket == bucket)
        return chosen if self.holdout_entries else chosen[:VALIDATION_TRAIN_SAMPLES]

    def validation_batch(self, *, generator: torch.Generator | None = None, sample: bool = False) -> dict[str, Any] | None:
        """The samples of :meth:`validation_entries` (None for an empty cache)."""
        chosen = self.validation_entries()
        return self._load(chosen, epoch=0, dropout=0.0, generator=generator, sample=sample) if chosen else None

    def describe_holdout(self) -> str:
        """One line for the log: what was held out, and what the validation loss is computed on."""
        n, held = len(self.index.entries), len(self.holdout_entries)
        if held:
            keys = [self.index.entries[i].key for i in self.holdout_entries]
            shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            return (f"held out {held} of {n} samples for the validation loss (never trained on): {shown}; "
                    f"the loss uses {len(self.validation_entries())} of them (one bucket)")
        used = len(self.validation_entries())
        return (f"held out nothing: all {n} samples train (data.holdout=N holds out N; automatic from "
                f"{HOLDOUT_AUTO_MIN} samples on); the validation loss is on {used} training samples at fixed noise")

    def holdout_batch(self, *, generator: torch.Generator | None = None, sample: bool = False) -> dict[str, Any] | None:
        """The held-out samples of the largest holdout bucket (one bucket: one tensor shape), or None."""
        if not self.holdout_entries:
            return None
        buckets = Counter(self.index.entries[i].bucket for i in self.holdout_entries)
        bucket = max(sorted(buckets), key=lambda b: buckets[b])
        chosen = tuple(i for i in self.holdout_entries if self.index.entries[i].bucket == bucket)
        return self._load(chosen, epoch=0, dropout=0.0, generator=generator, sample=sample)

    def _load(self, positions: tuple[int, ...], *, epoch: int, dropout: float,
              generator: torch.Generator | None, sample: bool, flips: bool = False, batch: int = 0) -> dict[str, Any]:
        import torch

        entries = [self.index.entries[i] for i in positions]
        # entry-first: each entry's shard is looked up once, however many shards the batch spans
        fields = FIELDS + (MASK_FIELD,) if self.index.settings.get("masked_loss") else FIELDS
        flipped = [flips and stable_seed("flip", self.seed, epoch, batch, row, e.key) % 2 == 1 for row, e in enumerate(entries)]
        rows = [self.reader.entry(e.shard, e.id, fields + (FLIP_FIELDS if f else ())) for e, f in zip(entries, flipped, strict=True)]
        for row, f in zip(rows, flipped, strict=True):  # data.random_flip: the mirrored image, encoded at caching
            if f:
                row["latents_mean"], row["latents_std"] = row.pop(FLIP_FIELDS[0]), row.pop(FLIP_FIELDS[1])
                if MASK_FIELD in row:
                    row[MASK_FIELD] = row[MASK_FIELD].flip(-1)
        out: dict[str, Any] = {name: torch.stack([row[name] for row in rows]) for name in fields}
        out["flipped"] = flipped
        dropped = [caption_dropped(e.key, seed=self.seed, epoch=epoch, rate=dropout) for e in entries]
        if any(dropped):
            empty = self.empty_prompt()
            for row, is_dropped in enumerate(dropped):
                if is_dropped:
                    out["prompt_embeds"][row] = empty["prompt_embeds"][0].to(out["prompt_embeds"].dtype)
                    out["pooled_prompt_embeds"][row] = empty["pooled_prompt_embeds"][0].to(out["pooled_prompt_embeds"].dtype)
        out["keys"] = [e.key for e in entries]
        out["dropped_captions"] = dropped
        # what the text encoders saw ("" where the caption was dropped), for live encoders (sd35hub.train.live_text)
        out["captions"] = ["" if d else e.caption for e, d in zip(entries, dropped, strict=True)]
        if sample:
            out["latents"] = sample_latents(out["latents_mean"], out["latents_std"], generator,
                                            self.index.shift_factor, self.index.scaling_factor)
        return out
