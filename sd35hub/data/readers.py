"""Raw records from each source format: (key, image bytes, caption) with nothing decoded yet.

Readers only move bytes; :mod:`sd35hub.data.sources` decodes, validates and counts. Every reader
streams (one record, or one parquet row group, in memory at a time) and yields records in a
stable order, with stable keys (local: the relative path; Hub: ``dataset/split/row``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35hub.data.images import IMAGE_EXTENSIONS
from sd35hub.errors import DatasetError, RepoNotFoundError

IMAGE_COLUMNS = ("image", "img", "png", "jpg", "jpeg", "webp", "file_name")
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt", "caption_text", "captions", "description")
CAPTION_EXTENSIONS = ("txt", "caption")


@dataclass(frozen=True)
class RawRecord:
    key: str
    image_bytes: bytes | None  # None: the image is missing
    caption: str | bytes | None  # None: no caption at all; bytes: encoding still unknown
    corrupt: bool = False  # the container itself was unreadable at this point


def detect_columns(
    columns: list[str], image_column: str | None, caption_column: str | None, source: str
) -> tuple[str, str]:
    """(image column, caption column): the overrides if given, else the first known name."""

    def pick(override: str | None, known: tuple[str, ...], what: str, flag: str) -> str:
        if override is not None:
            if override in columns:
                return override
            raise DatasetError(
                f"{source} has no column {override!r} (set by --{flag}); its columns are: "
                f"{', '.join(columns) or '(none)'}. Pass --{flag} with one of them."
            )
        lowered = {c.lower(): c for c in columns}
        for name in known:
            if name in lowered:
                return lowered[name]
        raise DatasetError(
            f"Could not find the {what} column in {source}; its columns are: {', '.join(columns) or '(none)'}. "
            f"Pass --{flag} NAME (data.{flag.replace('-', '_')}=NAME) to choose one."
        )

    return (
        pick(image_column, IMAGE_COLUMNS, "image", "image-column"),
        pick(caption_column, CAPTION_COLUMNS, "caption", "caption-column"),
    )


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# ---------------------------------------------------------------- local folder of images
def read_folder(root: Path, image_column: str | None, caption_column: str | None) -> Iterator[RawRecord]:
    """Images with same-name .txt captions, or a metadata.jsonl / metadata.csv beside them."""
    for meta_name in ("metadata.jsonl", "metadata.csv"):
        if (root / meta_name).is_file():
            yield from _read_metadata(root, root / meta_name, image_column, caption_column)
            return
    images = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and not p.name.lower().endswith(".mask.png")  # loss masks (sd35hub.data.masks), not images
    )
    for path in images:
        caption_path = path.with_suffix(".txt")
        caption = _read_bytes(caption_path) if caption_path.is_file() else None
        yield RawRecord(path.relative_to(root).as_posix(), _read_bytes(path), caption)


def _metadata_rows(meta: Path) -> Iterator[dict[str, Any]]:
    if meta.suffix == ".jsonl":
        with meta.open(encoding="utf-8-sig") as lines:
            for line in lines:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield {}  # counted as a missing image below
    else:
        with meta.open(encoding="utf-8-sig", newline="") as handle:
            yield from csv.DictReader(handle)


def _read_metadata(
    root: Path, meta: Path, image_column: str | None, caption_column: str | None
) -> Iterator[RawRecord]:
    rows = _metadata_rows(meta)
    first = next(rows, None)
    if first is None:
        return
    image_col, caption_col = detect_columns(list(first), image_column, caption_column, str(meta))
    for row in itertools.chain([first], rows):
        name = row.get(image_col)
        path = root / str(name) if name else None
        key = path.relative_to(root).as_posix() if path else f"{meta.name}#missing"
        image = _read_bytes(path) if path and path.is_file() else None
        caption = row.get(caption_col)
        yield RawRecord(key, image, None if caption is None else str(caption))


# ---------------------------------------------------------------- parquet
def _image_value(value: Any, base: Path | None) -> bytes | None:
    """Bytes from a parquet/datasets image cell: raw bytes, or {"bytes": ..., "path": ...}."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path") and base is not None and (base / value["path"]).is_file():
            return _read_bytes(base / value["path"])
    return None


def read_parquet(files: list[Path], root: Path, image_column: str | None, caption_column: str | None) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for junk files
            raise DatasetError(f"{file} is not a readable parquet file ({exc}); remove or replace it.") from exc
        image_col, caption_col = detect_columns(parquet.schema_arrow.names, image_column, caption_column, str(file))
        rel = file.relative_to(root).as_posix() if file != root else file.name
        row = 0
        for batch in parquet.iter_batches(batch_size=32, columns=[image_col, caption_col]):
            for image, caption in zip(batch.column(image_col).to_pylist(), batch.column(caption_col).to_pylist(), strict=True):
                yield RawRecord(f"{rel}#{row}", _image_value(image, file.parent), caption)
                row += 1


# ---------------------------------------------------------------- webdataset tars
def read_webdataset(files: list[Path], root: Path) -> Iterator[RawRecord]:
    """``key.jpg|png|webp`` + ``key.txt`` members grouped by key (the name before the first dot)."""
    for file in files:
        rel = file.relative_to(root).as_posix() if file != root else file.name
        group: dict[str, bytes] = {}
        current: str | None = None
        try:
            with tarfile.open(file, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{directory}/{stem}" if directory else stem
                    if current is not None and key != current:
                        yield _wds_record(rel, current, group)
                        group = {}
                    current = key
                    extracted = tar.extractfile(member)
                    group[ext.lower()] = extracted.read() if extracted else b""
        except (tarfile.TarError, OSError, EOFError):
            yield RawRecord(f"{rel}#unreadable", None, None, corrupt=True)
        if current is not None:
            yield _wds_record(rel, current, group)


def _wds_record(rel: str, key: str, group: dict[str, bytes]) -> RawRecord:
    image = next((group[e] for e in group if f".{e}" in IMAGE_EXTENSIONS), None)
    caption = next((group[e] for e in CAPTION_EXTENSIONS if e in group), None)
    return RawRecord(f"{rel}/{key}", image, caption)


# ---------------------------------------------------------------- Hub datasets (streamed)
def read_hub(
    dataset_id: str, split: str, image_column: str | None, caption_column: str | None, token: str | bool | None
) -> Iterator[RawRecord]:
    """Stream a Hub dataset with `datasets`; images are left undecoded so a bad one is a counted skip.
    Hub failures (unreachable, no answer, 5xx after retries, bad token) are sd35hub's typed Hub errors."""
    from sd35hub.access import hub_errors

    with hub_errors(dataset_id, repo_type="dataset", token=token, what=f"reading the dataset {dataset_id}"):
        _check_reachable(dataset_id, token)
        yield from _read_hub(dataset_id, split, image_column, caption_column, token)


def _check_reachable(dataset_id: str, token: str | bool | None) -> None:
    """One metadata request first (sd35hub's timeouts and retries): a missing, gated or unreachable
    dataset fails here at once, not after datasets' own download retries. Offline: the cache decides."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return
    HfApi().dataset_info(dataset_id, token=token, files_metadata=False)


def _read_hub(
    dataset_id: str, split: str, image_column: str | None, caption_column: str | None, token: str | bool | None
) -> Iterator[RawRecord]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True, token=token)
    except DatasetNotFoundError as exc:
        raise RepoNotFoundError(dataset_id, "dataset", detail=str(exc).splitlines()[0]) from exc
    except ValueError as exc:  # unknown split, among others
        raise DatasetError(f"Could not open split {split!r} of {dataset_id}: {exc}. Pass --split with an existing split.") from exc
    columns = list(stream.column_names or [])
    if not columns:  # features unknown until the first row
        columns = list(next(iter(stream)).keys())
    image_col, caption_col = detect_columns(columns, image_column, caption_column, dataset_id)
    # Undecoded images ({"bytes", "path"}): casting the column to Image(decode=False) is not
    # enough for imagefolder repos (their builder decodes anyway); IterableDataset.decode(False) is.
    if hasattr(stream, "decode"):
        stream = stream.decode(False)
    elif isinstance((stream.features or {}).get(image_col), datasets.Image):
        stream = stream.cast_column(image_col, datasets.Image(decode=False))
    for row_index, row in enumerate(stream):
        value = row.get(image_col)
        image = _image_value(value, None)
        if image is None and isinstance(value, dict) and value.get("path"):
            image = _open_remote(value["path"], token)
        elif image is None and hasattr(value, "save"):  # already a PIL image: re-encode losslessly
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            image = buffer.getvalue()
        yield RawRecord(f"{dataset_id}/{split}/{row_index}", image, row.get(caption_col))


def _open_remote(path: str, token: str | bool | None) -> bytes | None:
    """An image file referenced by path (e.g. hf://datasets/...), read through datasets' own opener."""
    from datasets import DownloadConfig
    from datasets.utils.file_utils import xopen

    try:
        with xopen(path, "rb", download_config=DownloadConfig(token=token)) as handle:
            return handle.read()
    except (OSError, ValueError):
        return None
