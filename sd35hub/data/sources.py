"""One entry point from a :class:`~sd35hub.config.DataSpec` to a stream of usable samples.

    stream = open_samples(DataSpec(source="lambdalabs/naruto-blip-captions", trigger_word="nrt style"))
    for sample in stream:          # Sample(key, image: RGB PIL image, caption, content_hash)
        ...
    print(stream.stats.summary())  # "1221 usable of 1221 seen"

``source`` may be a Hub dataset id (streamed with ``datasets``, never downloaded whole), a local
folder (images + same-name ``.txt`` captions, or ``metadata.jsonl`` / ``metadata.csv``), a
``.parquet`` file / folder of them / glob, a webdataset ``.tar`` / folder of them / glob, or
``sample`` (the embedded dataset). Bad records are skipped and counted (see
:mod:`sd35hub.data.images`); a dataset with no usable sample raises :class:`DatasetError`.

Captions: a missing or empty caption keeps the sample with an empty caption (counted as a fix),
because with a trigger word an image alone still teaches the concept. Caption dropout is *not*
applied here: it is decided per (seed, epoch, key) at batch time by :func:`caption_dropped`, so
cached embeddings stay valid (the trainer swaps in the cached empty-caption embedding).
"""

from __future__ import annotations

import glob
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data import readers
from sd35hub.data.images import (
    MAX_CAPTION_CHARS,
    MAX_PIXELS,
    SkipStats,
    clean_caption,
    decode_caption,
    decode_image,
)
from sd35hub.errors import DatasetError


@dataclass(frozen=True)
class Sample:
    key: str  # stable id: relative path, or "dataset/split/row"
    image: Image.Image  # RGB, EXIF-transposed, full size
    caption: str  # after the trigger word / tag shuffle tweaks
    content_hash: str = ""  # sha256 of the raw image bytes (cache key; with its mask when data.masked_loss)
    mask: Image.Image | None = None  # data.masked_loss: mode L, image size (sd35hub.data.masks); None = all ones


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "folder" | "parquet" | "webdataset" | "hub"
    location: str  # folder/root path or Hub id
    files: tuple[Path, ...] = ()


def resolve_source(source: str) -> ResolvedSource:
    """Which reader a ``data.source`` string means."""
    if source == "sample":
        from sd35hub.data.sample import sample_dataset_path

        return ResolvedSource("folder", str(sample_dataset_path()))
    if any(ch in source for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
        return _from_files(matches, source, Path(_glob_root(source)))
    path = Path(source).expanduser()
    if path.is_file():
        return _from_files([path], source, path.parent)
    if path.is_dir():
        has_images = any(p.suffix.lower() in readers.IMAGE_EXTENSIONS for p in path.rglob("*"))
        has_meta = (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file()
        if not has_images and not has_meta:
            parquet = sorted(path.rglob("*.parquet"))
            tars = sorted(path.rglob("*.tar"))
            if parquet or tars:
                return _from_files(parquet or tars, source, path)
        return ResolvedSource("folder", str(path))
    looks_local = source.startswith((".", "/", "~")) or source.endswith((".parquet", ".tar")) or source.count("/") > 1
    if looks_local:
        raise DatasetError(f"Dataset path {source!r} does not exist; check the path (or pass a Hub dataset id).")
    return ResolvedSource("hub", source)


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    first_wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    fixed = parts[:first_wild]
    return str(Path(*fixed)) if fixed else "."


def _from_files(files: list[Path], source: str, root: Path) -> ResolvedSource:
    if not files:
        raise DatasetError(f"No files match {source!r}; check the path or pattern.")
    suffixes = {f.suffix.lower() for f in files}
    if suffixes == {".parquet"}:
        return ResolvedSource("parquet", str(root), tuple(files))
    if suffixes == {".tar"}:
        return ResolvedSource("webdataset", str(root), tuple(files))
    raise DatasetError(
        f"{source!r} names {', '.join(sorted(suffixes))} files; a dataset file must be .parquet or a webdataset .tar "
        "(or pass a folder of images with .txt captions)."
    )


# ---------------------------------------------------------------- caption tweaks
def stable_seed(*parts: object) -> int:
    """A stable 64-bit seed from any values (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def tweak_caption(caption: str, spec: DataSpec, *, key: str, seed: int = 0) -> str:
    """Tag shuffle (first ``keep_tags`` fixed; deterministic per seed + key), then the trigger word
    prepended unless the caption already contains it."""
    caption = clean_caption(caption)
    if spec.shuffle_tags and "," in caption:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[: spec.keep_tags], tags[spec.keep_tags :]
        random.Random(stable_seed("shuffle", seed, key)).shuffle(tail)
        caption = ", ".join(head + tail)
    trigger = spec.trigger_word.strip()
    if trigger and trigger.lower() not in caption.lower():
        caption = f"{trigger}, {caption}" if caption else trigger
    return caption


def caption_dropped(key: str, *, seed: int, epoch: int, rate: float) -> bool:
    """Whether this sample trains on the empty caption this epoch (deterministic, ~rate of samples)."""
    if rate <= 0.0:
        return False
    return random.Random(stable_seed("dropout", seed, epoch, key)).random() < rate


# ---------------------------------------------------------------- the stream
class SampleStream:
    """Iterable of :class:`Sample`; ``stats`` fills while iterating (reset by each new iteration)."""

    def __init__(self, spec: DataSpec, *, seed: int = 0, token: str | bool | None = None,
                 max_records: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
        self.spec = spec
        self.seed = seed
        self.token = token
        self.max_records = max_records  # stop after reading this many records (check/preview)
        self.max_pixels = max_pixels
        self.source = resolve_source(spec.source)
        self.stats = SkipStats()

    def records(self) -> Iterator[readers.RawRecord]:
        src, spec = self.source, self.spec
        if src.kind == "folder":
            return readers.read_folder(Path(src.location), spec.image_column, spec.caption_column)
        if src.kind == "parquet":
            return readers.read_parquet(list(src.files), Path(src.location), spec.image_column, spec.caption_column)
        if src.kind == "webdataset":
            return readers.read_webdataset(list(src.files), Path(src.location))
        return readers.read_hub(src.location, spec.split, spec.image_column, spec.caption_column, self.token)

    def _mask(self, record: readers.RawRecord, decoded: object) -> tuple[Image.Image | None, str]:
        from sd35hub.data import masks

        path = Path(self.source.location) / record.key if self.source.kind == "folder" else None
        mask, origin = masks.find_mask(path, record.image_bytes or b"", decoded.image.size)  # type: ignore[attr-defined]
        if mask is None:
            self.stats.fix("unreadable_mask" if origin == "unreadable" else "no_mask")
        return mask, masks.combined_hash(decoded.content_hash, mask)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Sample]:
        self.stats = stats = SkipStats()
        spec = self.spec
        for record in self.records():
            if self.max_records is not None and stats.seen >= self.max_records:
                break
            stats.seen += 1
            if record.corrupt:
                stats.skip("corrupt")
                continue
            if record.skip is not None:
                stats.skip(record.skip)
                continue
            caption = decode_caption(record.caption)
            if caption is None and record.caption is not None:
                stats.skip("bad_caption_encoding")
                continue
            decoded = decode_image(
                record.image_bytes, min_size=spec.min_size, max_aspect=spec.max_aspect, max_pixels=self.max_pixels
            )
            if isinstance(decoded, str):
                stats.skip(decoded)
                continue
            for fix in decoded.fixes:
                stats.fix(fix)
            if caption is None:
                stats.fix("missing_caption")
                caption = ""
            elif not caption.strip():
                stats.fix("empty_caption")
            elif len(caption) > MAX_CAPTION_CHARS:
                stats.fix("caption_truncated")
                caption = caption[:MAX_CAPTION_CHARS]
            stats.usable += 1
            mask, content_hash = None, decoded.content_hash
            if spec.masked_loss:
                mask, content_hash = self._mask(record, decoded)
            yield Sample(record.key, decoded.image, tweak_caption(caption, spec, key=record.key, seed=self.seed),
                         content_hash, mask)
            if spec.max_samples is not None and stats.usable >= spec.max_samples:
                break


def open_samples(spec: DataSpec, *, seed: int = 0, token: str | bool | None = None) -> SampleStream:
    """The usable samples of ``spec.source``, streamed; see the module docstring."""
    return SampleStream(spec, seed=seed, token=token)


def check_dataset(spec: DataSpec, *, limit: int | None = None, token: str | bool | None = None) -> SkipStats:
    """Scan the source (or its first ``limit`` records) without loading any model.

    Raises :class:`DatasetError` when nothing usable was found, with the skip counts and a fix.
    """
    stream = SampleStream(spec, token=token, max_records=limit)
    for _ in stream:
        pass
    if stream.stats.usable == 0:
        raise DatasetError(no_usable_message(spec, stream.stats))
    return stream.stats


def no_usable_message(spec: DataSpec, stats: SkipStats) -> str:
    if stats.seen == 0:
        return f"The dataset {spec.source!r} is empty: no images were found. Check the path / dataset id and --split."
    return (
        f"The dataset {spec.source!r} has no usable image ({stats.summary()}). "
        f"Check data.min_size={spec.min_size} and data.max_aspect={spec.max_aspect}, or fix the files."
    )
