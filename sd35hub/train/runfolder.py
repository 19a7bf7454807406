"""One run per output folder: a lock against a second concurrent ``train``, and a refusal to start a
new run into a folder that holds another run's work unless ``--resume`` is given.

    with RunLock(output_dir):          # OUTPUT/.sd35hub-train.lock, flock'ed for the whole run
        check_fresh_folder(cfg, checkpoint_dir)

The lock is an advisory ``fcntl.flock`` on a file in the folder: the kernel drops it when the process
ends however it ends (SIGKILL included), so a crashed run never leaves a stale lock behind. The file
holds the owner's pid and start time, for the message a second run prints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sd35hub.errors import ConfigError

LOCK_FILE = ".sd35hub-train.lock"


class RunLock:
    """Exclusive lock on an output folder (no-op where flock does not exist, e.g. Windows)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise ConfigError(
                f"another `sd35hub train` is writing into {self.output_dir}{owner}; wait for it to finish "
                "(or stop it), or pass another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {int(raw['pid'])}, since {raw['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_fresh_folder(output_dir: Path, checkpoint_dir: Path, resume: str | None) -> None:
    """A run without ``resume`` must not start into a folder holding another run's checkpoints or
    finished outputs: its "keep the last K" would delete its own new checkpoints (the old run's have
    higher steps), and its outputs would replace the old run's."""
    if resume:
        return
    from sd35hub.train.checkpoint import list_checkpoints

    found = list_checkpoints(checkpoint_dir)
    finished = (Path(output_dir) / "summary.json").is_file()
    if not found and not finished:
        return
    what = []
    if found:
        what.append(f"{len(found)} checkpoint(s) up to {found[-1].name}")
    if finished:
        what.append("a finished run's summary.json and adapter")
    raise ConfigError(
        f"{output_dir} holds another run ({'; '.join(what)}): pass --resume latest to continue it, or another "
        "--output for a new run (delete the folder to start over in it)"
    )
