"""An OS or network failure as the typed error it stands for, for every front end to word.

A library writer wraps its own writes (sd35hub.diskspace.writing), and Hub calls go through
sd35hub.access / sd35hub.hubhttp; what still escapes as a bare ``OSError`` or a connection failure of
httpx / requests / huggingface_hub is turned into an sd35hub error here by :func:`typed_error`:

* a full disk (ENOSPC, quota, the libraries' own wording) -> ``DiskFullError`` (sd35hub.diskspace);
* no permission, a read-only filesystem, a file where a folder is needed -> ``FileWriteError``;
* the Hub unreachable (refused, dropped, DNS, timeout, offline mode) -> ``HubRequestError``.

The CLI (``format_error``), the notebook (``colab.setup``'s error display, ``colab_tools.evaluate``) and the
Space (``visitor_message``) call it before they word an error. Nothing here imports an HTTP library: the
network error types are looked up only in the modules already imported.
"""

from __future__ import annotations

import errno
import os
import sys

from sd35hub.errors import FileWriteError, HubRequestError, Sd35HubError

_NETWORK_TYPES = (
    ("httpx", ("TransportError",)),
    ("httpx2", ("TransportError",)),
    ("requests.exceptions", ("ConnectionError", "Timeout")),
    ("huggingface_hub.errors", ("LocalEntryNotFoundError", "OfflineModeIsEnabled")),
)


def error_chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it (``raise ... from``, or raised while handling), outermost first."""
    seen: list[BaseException] = []
    item: BaseException | None = exc
    while item is not None and item not in seen and len(seen) < 20:
        seen.append(item)
        item = item.__cause__ or item.__context__
    return seen


def network_error(exc: BaseException) -> BaseException | None:
    """The connection/timeout failure behind ``exc``, if it is one (httpx, requests, datasets, OS)."""
    kinds: list[type] = [ConnectionError, TimeoutError]
    for module, names in _NETWORK_TYPES:
        mod = sys.modules.get(module)
        kinds += [getattr(mod, n) for n in names if mod is not None and isinstance(getattr(mod, n, None), type)]
    for item in error_chain(exc):
        if isinstance(item, tuple(kinds)):
            return item
    return None


def hub_endpoint() -> str:
    """The Hub endpoint in use, without importing huggingface_hub (its constants if loaded, else HF_ENDPOINT)."""
    hub = sys.modules.get("huggingface_hub.constants")
    return getattr(hub, "ENDPOINT", None) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def os_error(exc: BaseException) -> Sd35HubError | None:
    """A full disk or an unwritable path anywhere in the chain, as its typed error; None otherwise."""
    from sd35hub.diskspace import disk_full_error

    full = disk_full_error(exc)
    if full is not None:
        return full
    for item in error_chain(exc):
        if not isinstance(item, OSError) or not item.filename:
            continue
        if item.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return FileWriteError(f"Cannot write {item.filename}: {item.strerror or item}. Choose a folder you can "
                                  "write to (--output, data.cache_dir, train.checkpoint_dir).")
        if item.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return FileWriteError(f"Cannot write {item.filename}: {item.strerror or item} (a file where a folder is "
                                  "needed, or a folder where a file is). Choose another output path.")
    return None


def typed_error(exc: BaseException) -> BaseException:
    """``exc`` itself, or the sd35hub error it stands for (disk full, unwritable path, unreachable Hub)."""
    if isinstance(exc, Sd35HubError):
        return exc
    found = os_error(exc)
    if found is not None:
        return found
    net = network_error(exc)
    if net is not None:
        detail = " ".join(str(net).split())[:300] or type(net).__name__
        return HubRequestError(
            f"Could not reach the Hub at {hub_endpoint()}: {type(net).__name__}: {detail}. Check your network "
            "(and HF_ENDPOINT / HF_HUB_OFFLINE), then run again."
        )
    return exc
