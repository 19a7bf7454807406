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
    skip: str | None = None  # a sample-level fault found while reading (the skip reason)


def caption_value(value: Any) -> tuple[str | bytes | None, str | None]:
    """(caption, skip reason) from an untrusted cell: text or bytes as they are; a list of texts
    (several captions) gives its first non-empty one; a number, mapping or anything else is not
    a caption (skipped, never turned into "5" or "{'a': 1}")."""
    if value is None or isinstance(value, (str, bytes)):
        return value, None
    if isinstance(value, bytearray):
        return bytes(value), None
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bytes)) for v in value):
        return next((v for v in value if v and (v.strip() if isinstance(v, str) else v.strip())), value[0] if value else None), None
    return None, "bad_caption_type"


def inside(root: Path, name: Any) -> Path | None:
    """``root / name`` when it is a relative path that stays inside ``root`` (symlinks resolved);
    None for absolute paths, ``..`` escapes, NUL bytes and names the OS rejects."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
        return None
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return None
    try:
        path = root / name
        resolved, base = path.resolve(), root.resolve()
        return root / resolved.relative_to(base)  # normalised: "sub/../a.png" is the key "a.png"
    except (OSError, ValueError, RuntimeError):
        return None


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


def _image_record(key: str, path: Path | None, caption: str | bytes | None) -> RawRecord:
    """A record for an image file: missing, unreadable (permissions, a folder, an I/O error) or its bytes."""
    if path is None:
        return RawRecord(key, None, caption)
    try:
        if not path.is_file():
            return RawRecord(key, None, caption)
        return RawRecord(key, path.read_bytes(), caption)
    except (OSError, ValueError):
        return RawRecord(key, None, caption, skip="unreadable_file")


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
        try:
            caption = caption_path.read_bytes() if caption_path.is_file() else None
        except OSError:
            caption = None
        yield _image_record(path.relative_to(root).as_posix(), path, caption)


CSV_FIELD_LIMIT = 16 * 1024 * 1024  # csv's own default (128 KiB) is an error, not a skip, on a long caption


def _metadata_rows(meta: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) of metadata.jsonl / metadata.csv. A JSONL line that is not JSON
    comes as None (a counted skip); a file that is not UTF-8 text, or a CSV that cannot be parsed,
    is a DatasetError naming the file and line."""
    if meta.suffix == ".jsonl":
        with meta.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DatasetError(f"{meta} line {number} is not UTF-8 text; save the file as UTF-8.") from None
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except (ValueError, RecursionError):
                        yield number, None
        return
    data = meta.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{meta} line {line} is not UTF-8 text; save the file as UTF-8.") from None
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        raise DatasetError(f"{meta} line {reader.line_num} cannot be read as CSV ({exc}); fix that line.") from None


def _read_metadata(
    root: Path, meta: Path, image_column: str | None, caption_column: str | None
) -> Iterator[RawRecord]:
    rows = _metadata_rows(meta)
    pending: list[tuple[int, Any]] = []
    first: dict[str, Any] | None = None
    for number, row in rows:  # columns come from the first row that is an object
        pending.append((number, row))
        if isinstance(row, dict):
            first = row
            break
    if first is None:
        for number, _ in pending:
            yield RawRecord(f"{meta.name}#line{number}", None, None, skip="bad_metadata_row")
        return
    columns = [str(c) for c in first if isinstance(c, str)]
    image_col, caption_col = detect_columns(columns, image_column, caption_column, str(meta))
    for number, row in itertools.chain(pending, rows):
        line_key = f"{meta.name}#line{number}"
        if not isinstance(row, dict):
            yield RawRecord(line_key, None, None, skip="bad_metadata_row")
            continue
        name = row.get(image_col)
        caption, bad = caption_value(row.get(caption_col))
        if name is None or name == "":
            yield RawRecord(line_key, None, caption, skip=bad)
            continue
        path = inside(root, name)
        if path is None:
            yield RawRecord(line_key, None, None, skip="path_outside_folder" if isinstance(name, str) else "bad_metadata_row")
            continue
        record = _image_record(path.relative_to(root).as_posix(), path, caption)
        yield record if bad is None else RawRecord(record.key, record.image_bytes, None, skip=bad)


# ---------------------------------------------------------------- parquet
def _image_value(value: Any, base: Path | None) -> bytes | None:
    """Bytes from a parquet/datasets image cell: raw bytes, or {"bytes": ..., "path": ...}."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        raw = value.get("bytes")
        if isinstance(raw, (bytes, bytearray)):
            return bytes(raw)
        path = inside(base, value.get("path")) if base is not None else None
        if path is not None and path.is_file():
            return _read_bytes(path)
    if isinstance(value, str) and base is not None:  # a relative file name inside the dataset folder
        path = inside(base, value)
        if path is not None and path.is_file():
            return _read_bytes(path)
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
        batches = parquet.iter_batches(batch_size=32, columns=[image_col, caption_col])
        while True:
            try:
                batch = next(batches)
                images, captions = batch.column(image_col).to_pylist(), batch.column(caption_col).to_pylist()
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - pyarrow: ArrowInvalid / OSError / ... for a corrupt page
                raise DatasetError(f"{file} cannot be read after row {row} ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:200]}); remove or replace the file.") from None
            for image, caption in zip(images, captions, strict=True):
                value, bad = caption_value(caption)
                data = _image_value(image, file.parent)
                if data is None and image is not None and bad is None:
                    bad = "bad_image_value"  # e.g. bytes stored as a string, a number, a path outside the folder
                yield RawRecord(f"{rel}#{row}", data, value, skip=bad)
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
        caption, bad = caption_value(row.get(caption_col))
        if image is None and value is not None and bad is None:
            bad = "bad_image_value"
        yield RawRecord(f"{dataset_id}/{split}/{row_index}", image, caption, skip=bad)


def _open_remote(path: str, token: str | bool | None) -> bytes | None:
    """An image file referenced by path (e.g. hf://datasets/...), read through datasets' own opener."""
    from datasets import DownloadConfig
    from datasets.utils.file_utils import xopen

    try:
        with xopen(path, "rb", download_config=DownloadConfig(token=token)) as handle:
            return handle.read()
    except (OSError, ValueError):
        return None
