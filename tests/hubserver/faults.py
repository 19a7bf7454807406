"""Fault injection for the local Hub test server: what a flaky Hub or network does to a client.

`HubServer.inject(...)` adds a `Fault`; the handler asks `FaultPlan.take` before routing every
request. Actions:

- ``"status"``: answer ``status`` (default 503) with the Hub's error headers, optionally
  ``Retry-After`` and an ``X-Error-Code`` (e.g. ``"GatedRepo"``), without touching the state;
- ``"drop"``: close the connection without answering (the client sees a dropped connection);
- ``"hang"``: accept the request and never answer (until ``release_hangs()``, the server stops, or
  ``HANG_LIMIT_S``), then close — a server that accepts and never answers;
- ``"lose_response"``: do the request (a commit lands) and then close without the answer;
- ``"hang_after"``: do the request, then never answer (a commit whose response times out);
- ``"truncate"``: do the request and send only the first half of the answer (a download cut short).

A fault matches a method (``"*"``: any) and a substring of the URL path (``""``: any endpoint), and
fires ``times`` times (``None``: always) after letting ``skip`` matching requests through.
`SilentListener` is a whole endpoint that accepts TCP connections and never answers
(``with SilentListener() as silent:`` then point HF_ENDPOINT at ``silent.endpoint``).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

ACTIONS = ("status", "drop", "hang", "lose_response", "hang_after", "truncate")
BEFORE = ("status", "drop", "hang")  # decided before the request is routed; the rest after
HANG_LIMIT_S = 60.0  # a hang never outlives this, so a forgotten fault cannot wedge a test run


@dataclass
class Fault:
    method: str
    path_contains: str
    action: str = "status"
    status: int = 503
    times: int | None = 1
    skip: int = 0
    retry_after: float | None = None
    code: str | None = None  # X-Error-Code (huggingface_hub maps it to an exception class)
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0  # how many requests this fault answered

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"fault action must be one of {ACTIONS}, got {self.action!r}")
        self.method = self.method.upper()

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and self.path_contains in path

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def error_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        return headers


class FaultPlan:
    """The faults of one server, in the order they were added; thread-safe."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.released = threading.Event()  # set: every hang ends now

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        self.released.clear()
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
        self.release()

    def release(self) -> None:
        self.released.set()

    def take(self, method: str, path: str) -> Fault | None:
        """The first live fault matching this request, counted as fired (None: answer normally)."""
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or not fault.matches(method, path):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.hits += 1
                if fault.exhausted:
                    self._faults.remove(fault)
                return fault
        return None

    def hang(self) -> None:
        self.released.wait(HANG_LIMIT_S)


class SilentListener:
    """A TCP endpoint (``.endpoint``: ``http://127.0.0.1:<port>``) that accepts connections and never
    answers nor reads; ``.accepted`` counts them. Connections are closed when the block ends."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for conn in self._conns:
            conn.close()
        self._sock.close()

    def __enter__(self) -> SilentListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
