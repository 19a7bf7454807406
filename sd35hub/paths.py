"""Where sd35hub keeps what it builds itself (tiny model, sample dataset, sample adapters), and how
such a folder appears: built in a private temporary folder, then renamed into place in one step."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """`$SD35HUB_CACHE`, else `~/.cache/sd35hub`."""
    env = os.environ.get("SD35HUB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sd35hub"


def build_into_place(target: Path, build: Callable[[Path], Any], is_complete: Callable[[Path], bool]) -> Path:
    """Make ``target`` by ``build(staging)`` + rename, unless it is already complete.

    Safe when several processes race: each builds into its own temporary folder next to ``target``
    and renames it into place; the loser of the rename throws its copy away (builds must be
    deterministic). An incomplete ``target`` (a crash, or hand edits) is replaced."""
    if is_complete(target):
        return target
    from sd35hub.diskspace import writing

    with writing(target):
        return _build_into_place(target, build, is_complete)


def _build_into_place(target: Path, build: Callable[[Path], Any], is_complete: Callable[[Path], bool]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # complete builds only ever appear by rename, so this one is broken
        shutil.rmtree(target, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    normal_dir_mode(staging)
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def normal_dir_mode(path: Path) -> None:
    """A folder made by mkdtemp (0700) gets a normal folder's mode (0755 under umask 022)."""
    os.chmod(path, 0o777 & ~current_umask())


def atomic_write_text(path: Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"), needed=len(text.encode("utf-8")))


def atomic_write(path: Path, write: Callable[[Path], Any], needed: int | None = None) -> Path:
    """``write(temp)`` into a temp file of this writer alone next to ``path``, then rename it over
    ``path``: readers see the old file or the complete new one, never half of it; a failed write
    leaves nothing behind. A full disk is a DiskFullError naming ``path`` (and ``needed`` bytes)."""
    from sd35hub.diskspace import writing

    path = Path(path)
    with writing(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            write(Path(temp))
            os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes 0600: give the file a normal file's mode
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
    return path
