"""A timeout and a retry budget on every Hub request sd35hub makes, through huggingface_hub's own client.

huggingface_hub sends every request (HfApi, hf_hub_download, snapshot_download, HfFileSystem, so
datasets' Hub streaming too) through one shared ``httpx2.Client`` built by a factory that
``huggingface_hub.set_client_factory`` replaces. Its default client has no timeout, and most HfApi
calls pass ``timeout=None``: a server that accepts the connection and never answers hangs them for
ever, and one 503 fails ``whoami``/``auth_check``. ``install()`` (run by ``sd35hub.access.hub_errors``
before any Hub call) sets a factory whose client:

- gives every request a timeout: connect ``HF_HUB_ETAG_TIMEOUT`` (10 s), answer
  ``HF_HUB_DOWNLOAD_TIMEOUT`` (10 s) for reads, ``SD35HUB_HUB_WRITE_TIMEOUT`` (60 s) for writes —
  the first two are huggingface_hub's own settings, read from its ``constants`` on each request;
- retries requests that are safe to repeat (GET/HEAD and the read-only POSTs: paths-info, preupload,
  LFS batch; not hf_hub_download's metadata HEAD, which huggingface_hub retries itself) on 408/429/5xx,
  dropped connections and refused connections to the Hub host itself, ``SD35HUB_HUB_RETRIES`` times
  (3) with exponential backoff (0.5 s doubling, at most 8 s), honouring ``Retry-After`` and the Hub's
  ``RateLimit`` header (up to ``MAX_RETRY_AFTER_S``); a timeout is retried once. Commits and
  other writes are never repeated here: ``sd35hub.hub.publish`` retries them after checking the repo head.
  Where huggingface_hub's own ``http_backoff`` already retries a request (paginated listings,
  preupload, LFS, HfFileSystem), this client leaves those faults to it, so the budgets never multiply;
  its repeats to a host that has just let a request time out wait ``REPEAT_TIMEOUT_S`` (2 s) for an
  answer, not the full timeout six times.

A user's own client factory (set before sd35hub runs) is left in place.
"""

from __future__ import annotations

import email.utils
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value >= 0 and value == value else default


RETRIES = int(_env_float("SD35HUB_HUB_RETRIES", 3))  # retries after the first try (transient errors)
TIMEOUT_RETRIES = 1  # a request that timed out is tried once more (each try costs a whole timeout)
BASE_WAIT_S = 0.5  # first backoff; doubles each retry
MAX_WAIT_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for: the error says how long the Hub asked
WRITE_TIMEOUT_S = _env_float("SD35HUB_HUB_WRITE_TIMEOUT", 60.0)
# huggingface_hub's own backoff tries a request 6 times. When the host has just let a request time out,
# its repeats wait at most this long for an answer (not the full timeout again), for REPEAT_WINDOW_S.
REPEAT_TIMEOUT_S = 2.0
REPEAT_WINDOW_S = 60.0
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# POST endpoints that only read (or are answered the same when repeated): safe to retry.
IDEMPOTENT_POST = ("/paths-info/", "/preupload/", "/info/lfs/objects/batch", "/api/validate-yaml")

_lock = threading.Lock()
_installed = False
_timed_out: dict[tuple[str, int | None], float] = {}  # (host, port) -> when a request to it last timed out


def httpx_module() -> Any:
    """huggingface_hub's HTTP library: httpx2 (huggingface_hub >= 2.4) or httpx (earlier 2.x)."""
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older huggingface_hub 2.x
        import httpx as httpx2
    return httpx2


def read_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def connect_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


def _is_hub_host(host: str) -> bool:
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    return host == (urlsplit(constants.ENDPOINT).hostname or "")


def is_idempotent(method: str, path: str) -> bool:
    method = method.upper()
    return method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and any(p in path for p in IDEMPOTENT_POST))


def retried_here(method: str, path: str) -> bool:
    """Whether this client retries the request. Not writes (see sd35hub.hub.publish), and not the file
    metadata HEAD of hf_hub_download: huggingface_hub retries that one itself with backoff when no copy
    is cached, and falls back to the cached copy at once when there is one."""
    return is_idempotent(method, path) and not (method.upper() == "HEAD" and "/resolve/" in path)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the Hub asks to wait: ``RateLimit`` (remaining 0: reset time) or ``Retry-After`` (seconds
    or an HTTP date); None when it says nothing."""
    from huggingface_hub.utils import parse_ratelimit_headers

    info = parse_ratelimit_headers(headers)
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(retry: int, headers: Mapping[str, str] | None = None) -> float | None:
    """Wait before retry number ``retry`` (1-based): the Hub's Retry-After when it sent one, else
    exponential backoff. None: the Hub asked for longer than MAX_RETRY_AFTER_S (do not retry)."""
    asked = retry_after_s(headers) if headers is not None else None
    if asked is not None:
        return asked if asked <= MAX_RETRY_AFTER_S else None
    return min(BASE_WAIT_S * 2 ** (retry - 1), MAX_WAIT_S)


def _timeouts(request: Any, repeat: bool = False) -> None:
    """Fill in the timeouts the request lacks; an answer timeout is never above the configured one.
    ``repeat``: huggingface_hub repeats a request to a host that just timed out (REPEAT_TIMEOUT_S)."""
    given = dict(request.extensions.get("timeout") or {})
    write = not is_idempotent(request.method, request.url.path)
    limit = WRITE_TIMEOUT_S if write else read_timeout()
    if repeat:
        limit = min(limit, REPEAT_TIMEOUT_S)
    read = given.get("read")
    request.extensions = {
        **request.extensions,
        "timeout": {
            "connect": given.get("connect") or connect_timeout(),
            "read": limit if read is None else min(float(read), limit),
            "write": given.get("write") or WRITE_TIMEOUT_S,
            "pool": given.get("pool") or connect_timeout(),
        },
    }


def _hf_backoff() -> tuple[tuple[int, ...], tuple[type, ...]] | None:
    """(status codes, exception types) that huggingface_hub's own ``http_backoff`` retries, when it is
    the caller of this request (paginated listings, preupload, LFS, HfFileSystem reads); None otherwise.
    Those it retries itself, with its own budget and Retry-After handling: retrying them here too
    would multiply the two budgets."""
    frame = sys._getframe(2)
    for _ in range(60):
        if frame is None:
            return None
        if frame.f_code.co_name == "_http_backoff_base" and str(frame.f_globals.get("__name__", "")).startswith(
            "huggingface_hub."
        ):
            local = frame.f_locals
            if int(local.get("max_retries") or 0) <= 0:
                return (), ()
            statuses = local.get("retry_on_status_codes") or ()
            exceptions = local.get("retry_on_exceptions") or ()
            statuses = (statuses,) if isinstance(statuses, int) else tuple(statuses)
            exceptions = (exceptions,) if isinstance(exceptions, type) else tuple(exceptions)
            return statuses, exceptions
        frame = frame.f_back
    return None


def _client_class() -> type:
    httpx2 = httpx_module()

    class HubClient(httpx2.Client):
        """huggingface_hub's client with timeouts and retries of repeatable requests (module docstring)."""

        def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
            repeatable = retried_here(request.method, request.url.path)
            hf_statuses, hf_exceptions = _hf_backoff() or ((), ())
            host = (request.url.host, request.url.port)
            last = _timed_out.get(host)
            repeat = bool(hf_exceptions) and last is not None and time.monotonic() - last < REPEAT_WINDOW_S
            _timeouts(request, repeat)
            retries = timeouts = 0
            while True:
                try:
                    response = super().send(request, **kwargs)
                except httpx2.TimeoutException as exc:
                    _timed_out[host] = time.monotonic()
                    timeouts += 1
                    if isinstance(exc, hf_exceptions):
                        exc.sd35hub_attempts = None  # type: ignore[attr-defined]  # huggingface_hub retries it
                        exc.sd35hub_repeat = repeat  # type: ignore[attr-defined]
                        raise
                    if not repeatable or timeouts > TIMEOUT_RETRIES or retries >= RETRIES:
                        exc.sd35hub_attempts = retries + 1  # type: ignore[attr-defined]
                        raise
                    wait, reason = backoff_s(retries + 1), type(exc).__name__
                except (httpx2.NetworkError, httpx2.RemoteProtocolError) as exc:
                    # A host we cannot connect to at all is retried only when it is the Hub itself (not
                    # e.g. datasets' optional viewer/S3 lookups, which it skips when they fail).
                    unreachable = isinstance(exc, httpx2.ConnectError) and not _is_hub_host(request.url.host)
                    if isinstance(exc, hf_exceptions):
                        exc.sd35hub_attempts = None  # type: ignore[attr-defined]
                        raise
                    if not repeatable or retries >= RETRIES or unreachable:
                        exc.sd35hub_attempts = retries + 1  # type: ignore[attr-defined]
                        raise
                    wait, reason = backoff_s(retries + 1), type(exc).__name__
                else:
                    _timed_out.pop(host, None)
                    status = response.status_code
                    if status not in RETRY_STATUS or status in hf_statuses or not repeatable or retries >= RETRIES:
                        return response
                    wait, reason = backoff_s(retries + 1, response.headers), f"HTTP {status}"
                    if wait is None:  # the Hub asked for a longer pause than we wait: report it
                        return response
                    response.close()
                retries += 1
                logger.warning("%s %s: %s; retry %d/%d in %.1f s", request.method, request.url.path, reason,
                               retries, RETRIES, wait)
                time.sleep(wait or 0.0)

    return HubClient


def hub_client() -> Any:
    """The client factory ``install`` hands to huggingface_hub (its default one, plus the policy)."""
    from huggingface_hub.utils import _http

    hooks = [_http.hf_request_event_hook] if hasattr(_http, "hf_request_event_hook") else []
    return _client_class()(event_hooks={"request": hooks}, follow_redirects=True, timeout=None)


def install() -> None:
    """Use ``hub_client`` for huggingface_hub's shared session, unless another factory was set already."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http

        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if current is None or current is getattr(_http, "default_client_factory", None):
            set_client_factory(hub_client)
        else:
            logger.info("huggingface_hub has a custom HTTP client factory: sd35hub leaves its timeouts alone")
        _installed = True
