"""A full disk is a typed error that says where and about how much was needed, never a traceback.

Every writer (adapters, caches, checkpoints, previews, images) wraps its write in :func:`writing`;
whatever the layer that hit the full disk reports — ``OSError(ENOSPC)`` from Python or PIL,
safetensors' ``No space left on device (os error 28)``, torch's ``file write failed`` — becomes
:class:`~sd35hub.errors.DiskFullError` (exit 13). The CLI applies :func:`disk_full_error` to anything
that still reaches it.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sd35hub.errors import DiskFullError, Sd35HubError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# what libraries that do their own I/O say (safetensors: Rust io::Error; torch's C++ stream writer)
_FULL_TEXT = re.compile(r"no space left on device|storagefull|storage full|os error 28|disk quota exceeded", re.I)
_WRITE_FAILED = re.compile(r"file write failed|failed writing file|inline_container|unexpected pos", re.I)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent), None if unknown."""
    p = Path(path).expanduser().absolute()
    for candidate in (p, *p.parents):
        try:
            if candidate.exists():
                return shutil.disk_usage(candidate).free
        except OSError:
            return None
    return None


def tensor_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes a dict of tensors takes on disk (safetensors stores them raw, plus a small header)."""
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors.values()) + 4096


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        yield item
        item = item.__cause__ or item.__context__


def disk_full_error(exc: BaseException, path: str | Path | None = None, needed: int | None = None) -> DiskFullError | None:
    """The DiskFullError that ``exc`` stands for, or None when it is not a full disk."""
    where: str | None = None
    full = False
    for item in _chain(exc):
        if isinstance(item, DiskFullError):
            return item
        if isinstance(item, OSError) and item.errno in DISK_FULL_ERRNOS:
            full, where = True, where or (str(item.filename) if item.filename else None)
        elif _FULL_TEXT.search(str(item)):
            full = True
        elif path is not None and _WRITE_FAILED.search(str(item)):
            free = free_bytes(path)  # torch does not say why: a full disk if the write could not fit
            full = full or (free is not None and free < max(needed or 0, 1 << 20))
    if not full:
        return None
    target = str(path) if path is not None else (where or "the disk")
    return DiskFullError(target, needed, free_bytes(target) if target != "the disk" else None)


@contextmanager
def writing(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Inside the block, a full disk while writing ``path`` raises DiskFullError(path, needed)."""
    try:
        yield
    except Sd35HubError:
        raise
    except Exception as exc:
        error = disk_full_error(exc, path, needed)
        if error is None:
            raise
        raise error from exc


def ensure_free(path: str | Path, needed: int, what: str = "") -> None:
    """Refuse up front (DiskFullError) when ``needed`` bytes cannot fit where ``path`` will be written."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskFullError(f"{path}{f' ({what})' if what else ''}", needed, free)
