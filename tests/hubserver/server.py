"""`HubServer`: the local Hub-compatible server tests run the real huggingface_hub / datasets against.

Start it with `HubServer.start(port, tokens...)`; tests reach it through the `hub` fixture in
tests/conftest.py. The helper methods (seed_repo, gate, grant, inject/fail_next, files, commits,
requests) act on the server state directly, without HTTP. `inject` adds faults (tests/hubserver/faults.py);
`add_routes` lets another module serve more endpoints (e.g. Jobs) without touching the handler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any, NamedTuple

from .faults import Fault, FaultPlan
from .handler import PREFIX, HubHandler
from .jobs import JobsExecutor
from .state import HubState, Repo, Token

# An extra route: (handler, method, path segments, token) -> HTTP status it answered, or None if the
# request is not one of its routes. It runs under the state lock, after the built-in routes miss.
Route = Callable[[HubHandler, str, list[str], Token | None], int | None]


class _RequestFields(NamedTuple):
    method: str
    path: str  # URL path, percent-encoded as sent, without the query string
    status: int


class RequestRecord(_RequestFields):
    """(method, path, status) of one request — unpacks and compares like a 3-tuple; `.query` holds
    the raw query string, `.time` when it arrived (time.monotonic()), `.fault` the injected fault's
    action that answered it (None: answered normally). status 0: no answer was sent."""

    query: str
    time: float
    fault: str | None

    def __new__(cls, method: str, path: str, status: int, query: str = "", *, at: float | None = None,
                fault: str | None = None) -> RequestRecord:
        record = super().__new__(cls, method, path, status)
        # a NamedTuple subclass without __slots__ has a __dict__
        record.query, record.time, record.fault = query, time.monotonic() if at is None else at, fault
        return record


class HubServer:
    def __init__(self, port: int, token: str, read_token: str, other_token: str) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.token = token
        self.read_token = read_token
        self.other_token = other_token
        self.org = "sd35hub-org"  # alice's organisation (write role)
        self.state = HubState()
        self.requests: list[RequestRecord] = []
        self.faults = FaultPlan()
        self.extra_routes: list[Route] = []
        self._meta_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.jobs = JobsExecutor(self)  # HF Jobs: routes + local subprocess executor (tests/hubserver/jobs.py)

    @classmethod
    def start(
        cls,
        port: int,
        token: str,
        read_token: str,
        other_token: str,
        org: str = "sd35hub-org",
    ) -> HubServer:
        """Users: alice (write `token`, read `read_token`, member of `org` with write), bob (`other_token`)."""
        hub = cls(port, token, read_token, other_token)
        hub.org = org
        hub.add_user("alice", token, "write", orgs=(org,))
        hub.add_user("alice", read_token, "read")
        hub.add_user("bob", other_token, "write")
        handler = type("BoundHubHandler", (HubHandler,), {"hub": hub})
        hub._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        hub._httpd.daemon_threads = True
        hub._thread = threading.Thread(target=hub._httpd.serve_forever, name="local-hub", daemon=True)
        hub._thread.start()
        return hub

    def stop(self) -> None:
        self.faults.release()
        self.jobs.shutdown()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- users and access --------------------------------------------------------------------------
    def add_user(
        self,
        name: str,
        token: str,
        role: str = "write",
        orgs: tuple[str, ...] = (),
        scoped: dict[str, list[str]] | None = None,
    ) -> None:
        """Add a user (or another token of an existing user). role: "read", "write" or "fineGrained"
        (then `scoped` maps user/org names to permissions such as "repo.content.read", "repo.write";
        default: read+write on the user's own namespace)."""
        self.state.add_user(name, token, role, orgs, scoped)

    def gate(self, repo_id: str, mode: str = "manual", repo_type: str = "model") -> None:
        if mode not in ("auto", "manual"):
            raise ValueError(f"gate mode must be 'auto' or 'manual', got {mode!r}")
        with self.state.lock:
            self._repo(repo_id, repo_type).gated = mode

    def ungate(self, repo_id: str, repo_type: str = "model") -> None:
        with self.state.lock:
            self._repo(repo_id, repo_type).gated = False

    def grant(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        """`user` has accepted the license of the gated repo."""
        with self.state.lock:
            self._repo(repo_id, repo_type).granted.add(user)

    # -- repos -------------------------------------------------------------------------------------
    def seed_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str],
        *,
        repo_type: str = "model",
        gated: bool | str = False,
        private: bool = False,
        owner_token: str | None = None,
        revision: str = "main",
        message: str = "seed",
    ) -> str:
        """Create the repo if needed and commit `files` to `revision`; returns the commit sha.
        `gated=True` means "manual". The author is the owner of `owner_token` (default: alice)."""
        author = self.state.tokens[owner_token or self.token].user
        blobs = {path: data.encode() if isinstance(data, str) else bytes(data) for path, data in files.items()}
        with self.state.lock:
            repo, _ = self.state.create_repo(repo_type, repo_id, private, author)
            repo.private = private
            repo.gated = "manual" if gated is True else gated
            if revision not in repo.refs:
                repo.refs[revision] = repo.refs["main"]
            return self.state.commit(repo, revision, blobs, [], message, "", author).oid

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self.state.lock:
            commit = self._repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision!r} in {repo_type} {repo_id}")
            return dict(commit.files)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """History of `revision`, newest first: {"oid", "title", "message", "author", "files_changed"}."""
        with self.state.lock:
            repo = self._repo(repo_id, repo_type)
            commit = repo.resolve(revision)
            history = []
            while commit is not None:
                history.append({"oid": commit.oid, "title": commit.title, "message": commit.message,
                                "author": commit.author, "files_changed": list(commit.files_changed)})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return history

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """Branches and refs/pr/N -> commit oid."""
        with self.state.lock:
            return dict(self._repo(repo_id, repo_type).refs)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self.state.repos

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        try:
            return self.state.repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the test hub") from None

    # -- extra routes -------------------------------------------------------------------------------
    def add_routes(self, route: Route) -> None:
        """Serve more endpoints: `route` is asked about every request the built-in routes do not know."""
        if route not in self.extra_routes:
            self.extra_routes.append(route)

    # -- request log and fault injection -------------------------------------------------------------
    def inject(
        self,
        path_contains: str = "",
        method: str = "*",
        *,
        action: str = "status",
        status: int = 503,
        times: int | None = 1,
        skip: int = 0,
        retry_after: float | None = None,
        code: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """Fault the next `times` (None: every) requests of `method` ("*": any) whose URL path contains
        `path_contains` ("": any endpoint), after letting `skip` of them through. Actions: see
        hubserver.faults. Returns the Fault (`.hits` counts the requests it answered). Faults that
        fire forever must be removed with `clear_faults()` (the `hub_faults` fixture does it)."""
        return self.faults.add(Fault(method, path_contains, action, status, times, skip, retry_after, code,
                                     message, dict(headers or {})))

    def fail_next(self, method: str, path_contains: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests with this method whose path contains `path_contains` get `status`."""
        self.inject(path_contains, method, status=status, times=times)

    def clear_faults(self) -> None:
        """Remove every fault and end every hanging request."""
        self.faults.clear()

    def release_hangs(self) -> None:
        """End the requests that hang now (their connections are closed without an answer)."""
        self.faults.release()

    def _record(self, method: str, path: str, query: str, status: int, fault: str | None = None) -> None:
        with self._meta_lock:
            self.requests.append(RequestRecord(method, path, status, query, fault=fault))

    def clear_requests(self) -> None:
        with self._meta_lock:
            self.requests.clear()

    def downloads(self, repo_id: str, repo_type: str = "model") -> list[RequestRecord]:
        """Successful file GETs (resolve) of this repo: assert `== []` for "nothing was downloaded"."""
        prefix = f"/{PREFIX[repo_type]}{repo_id}/resolve/"
        with self._meta_lock:
            return [r for r in self.requests if r.method == "GET" and r.path.startswith(prefix) and r.status < 300]

    def api_calls(self, contains: str = "", method: str | None = None) -> list[RequestRecord]:
        """Requests whose path contains `contains` (optionally of one method)."""
        with self._meta_lock:
            return [r for r in self.requests if contains in r.path and (method is None or r.method == method)]
