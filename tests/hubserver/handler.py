"""HTTP routes of the local Hub test server (stdlib http.server, HTTP/1.1 keep-alive).

Routes mirror huggingface.co closely enough for the real huggingface_hub 2.4 client and datasets 5.2
streaming; errors carry `X-Error-Code` / `X-Error-Message` the way huggingface_hub's
`hf_raise_for_status` maps them to exception classes.
"""

from __future__ import annotations

import io
import json
import re
import socket
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import jobs, views
from .faults import BEFORE, Fault
from .state import HubError, Repo, Token, git_blob_oid, parse_card
from .uploads import UploadRoutes

if TYPE_CHECKING:
    from .server import HubServer

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files of a gated repo anyone may read (the Hub shows the card before the license is accepted).
# Repo info, tree and paths-info stay readable too (the file list is public); other downloads are refused.
UNGATED_FILES = ("README.md", ".gitattributes")
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)$")


class HubHandler(UploadRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sd35hub-test-hub/1.0"
    hub: HubServer  # set on the subclass built by HubServer.start

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def send_response(self, code: int, message: str | None = None) -> None:
        # Record before the status line goes out: once the client has the response, a test may read
        # hub.requests at once, so recording after the body is written would race with it.
        if not self._recorded:
            self._recorded = True
            self.hub._record(self._method, self._url.path, self._url.query, code, self._recorded_fault)
        super().send_response(code, message)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._method, self._url, self._recorded = method, url, False
        self.query = parse_qs(url.query, keep_blank_values=True)
        self.segments = [unquote(s) for s in url.path.split("/")[1:]]
        self.body = self._read_body()
        fault = self.hub.faults.take(method, url.path)
        self._recorded_fault: str | None = fault.action if fault is not None else None
        if fault is not None and fault.action in BEFORE and fault.action != "status":
            self._record_fault(fault, 0)
            if fault.action == "hang":
                self.hub.faults.hang()
            return self._drop()
        status = 500
        sink = None
        if fault is not None and fault.action != "status":  # answer into a buffer, then lose (part of) it
            sink, self.wfile = self.wfile, io.BytesIO()
        try:
            if fault is not None and fault.action == "status":
                raise HubError(fault.status, fault.message or f"Injected failure {fault.status} for {method} {url.path}",
                               fault.code, fault.error_headers())
            if self.segments[:2] == ["api", "jobs"]:  # Jobs (tests/hubserver/jobs.py): log streams run unlocked
                status = jobs.route(self, method)
            else:
                with self.hub.state.lock:
                    status = self._route(method)
        except HubError as err:
            status = self._error(err)
        except Exception as err:  # a server bug: answer 500 so the test sees it, with the reason
            status = self._error(HubError(500, f"test hub server error: {type(err).__name__}: {err}"))
        finally:
            if not self._recorded:  # no response was sent (e.g. the client went away)
                self._recorded = True
                self.hub._record(method, url.path, url.query, status)
        if sink is not None and fault is not None:
            answer, self.wfile = self.wfile.getvalue(), sink
            if fault.action == "truncate":  # the status line and headers, then half of the body
                head, _, body = answer.partition(b"\r\n\r\n")
                self.wfile.write(head + b"\r\n\r\n" + body[: len(body) // 2])
                self.wfile.flush()
            elif fault.action == "hang_after":
                self.hub.faults.hang()
            self._drop()

    def _record_fault(self, fault: Fault, status: int) -> None:
        self._recorded = True
        self.hub._record(self._method, self._url.path, self._url.query, status, fault.action)

    def _drop(self) -> None:
        """Close the connection without (the rest of) an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> int:
        return self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8", headers)

    def _error(self, err: HubError) -> int:
        headers = {"X-Error-Message": err.message.replace("\n", " ")[:500], **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return self._json({"error": err.message, **err.body}, err.status, headers)

    def _token(self) -> Token | None:
        auth = self.headers.get("Authorization", "")
        return self.hub.state.token_user(auth[7:].strip()) if auth.startswith("Bearer ") else None

    def _param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name) or self.query.get(name + "[]")
        return values[0] if values else default

    def _flag(self, name: str) -> bool:
        return (self._param(name) or "").lower() in ("1", "true")

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.hub.endpoint}/{PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- routing ----------------------------------------------------------------------------------
    def _route(self, method: str) -> int:
        seg = self.segments
        token = self._token()
        if seg[:1] == ["api"]:
            if seg[1:] == ["whoami-v2"] and method == "GET":
                if token is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return self._json(views.whoami(self.hub.state, token))
            if seg[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(token)
            if seg[1:] == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(token)
            if seg[1:] == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(seg) == 2 and seg[1] in TYPES and method == "GET":
                return self._list_repos(TYPES[seg[1]], token)
            if len(seg) >= 4 and seg[1] in TYPES:
                repo_type, repo_id, rest = TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
                return self._repo_api(method, repo_type, repo_id, rest, token)
        else:
            repo_type = TYPES.get(seg[0], "model") if seg[0] in ("datasets", "spaces") else "model"
            offset = 0 if repo_type == "model" else 1
            if len(seg) >= offset + 5 and seg[offset + 2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{seg[offset]}/{seg[offset + 1]}"
                revision, path = seg[offset + 3], "/".join(seg[offset + 4:])
                return self._resolve(repo_type, repo_id, revision, path, token)
        for route in self.hub.extra_routes:  # endpoints other modules add (HubServer.add_routes)
            answered = route(self, method, seg, token)
            if answered is not None:
                return answered
        raise HubError(404, f"Not found: {method} {self.path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], token: Token | None) -> int:
        state = self.hub.state
        repo = state.get_repo(repo_type, repo_id, token)
        action = rest[0] if rest else ""
        if method == "GET" and action in ("", "revision"):
            commit = self._commit_at(repo, rest[1] if action == "revision" else "main")
            info = views.repo_info(repo, commit)
            expand = self.query.get("expand") or self.query.get("expand[]")
            return self._json(views.pick(info, expand) if expand else info)
        if method == "GET" and action == "auth-check":
            if rest[1:] == ["write"] and not state.can_write(token, repo.namespace):
                raise HubError(403, f"You don't have write access to {repo_id}")
            state.check_gate(repo, token)
            return self._json({"success": True})
        if method == "GET" and action == "tree":
            commit = self._commit_at(repo, rest[1] if len(rest) > 1 else "main")
            path = "/".join(rest[2:])
            entries = views.tree_entries(commit, path, self._flag("recursive"))
            if entries is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            return self._json(entries)
        if method == "POST" and action == "paths-info":
            commit = self._commit_at(repo, rest[1] if len(rest) > 1 else "main")
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", []) or (json.loads(self.body or b"{}").get("paths", []) if not form else [])
            infos = [views.path_info(commit, p) for p in paths]
            return self._json([info for info in infos if info is not None])
        if method == "GET" and action == "commits":
            commit: Any = self._commit_at(repo, rest[1] if len(rest) > 1 else "main")
            history = []
            while commit is not None:
                history.append(views.commit_json(commit))
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._json(history)
        if method == "GET" and action == "refs":
            def ref(name: str, oid: str) -> dict[str, str]:
                full = name if name.startswith("refs/") else f"refs/heads/{name}"
                return {"name": name, "ref": full, "targetCommit": oid}
            branches = [ref(n, o) for n, o in repo.refs.items() if not n.startswith("refs/")]
            prs = [ref(n, o) for n, o in repo.refs.items() if n.startswith("refs/pr/")]
            return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})
        if action == "branch" and len(rest) >= 2:
            return self._branch(method, repo, "/".join(rest[1:]), token)
        if method == "PUT" and action == "settings":
            self._require_write(repo, token)
            settings = json.loads(self.body or b"{}")
            if "private" in settings:
                repo.private = bool(settings["private"])
            if "visibility" in settings:
                repo.private = settings["visibility"] == "private"
            if "gated" in settings:
                repo.gated = settings["gated"] or False
            return self._json({})
        if method == "POST" and action == "preupload":
            return self._preupload(repo, rest[1] if len(rest) > 1 else "main", token)
        if method == "POST" and action == "commit":
            return self._commit(repo, rest[1] if len(rest) > 1 else "main", token)
        raise HubError(404, f"Not found: {method} {self.path}")

    # -- repo helpers -----------------------------------------------------------------------------
    def _commit_at(self, repo: Repo, revision: str) -> Any:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _require_write(self, repo: Repo, token: Token | None) -> None:
        if token is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if not self.hub.state.can_write(token, repo.namespace):
            raise HubError(
                403, f"You don't have the rights to write to {repo.repo_id}: pass `create_pr=1` as a query "
                "parameter to create a Pull Request, or use a token with write access")

    def _create_repo(self, token: Token | None) -> int:
        if token is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = json.loads(self.body or b"{}")
        namespace = payload.get("organization") or token.user
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        if not self.hub.state.can_write(token, namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\"")
        repo, created = self.hub.state.create_repo(
            repo_type, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")), token.user)
        if not created:
            # the Hub answers the existing repo's url too: create_repo(exist_ok=True) reads it
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": self._repo_url(repo)})
        return self._json({"url": self._repo_url(repo), "name": repo_id, "id": views.repo_info(
            repo, repo.commits[repo.refs["main"]])["_id"]})

    def _delete_repo(self, token: Token | None) -> int:
        payload = json.loads(self.body or b"{}")
        namespace = payload.get("organization") or (token.user if token else "")
        repo = self.hub.state.get_repo(payload.get("type") or "model", f"{namespace}/{payload['name']}", token)
        self._require_write(repo, token)
        del self.hub.state.repos[(repo.repo_type, repo.repo_id)]
        return self._json({})

    def _validate_yaml(self) -> int:
        payload = json.loads(self.body or b"{}")
        content = payload.get("content", "")
        if content.lstrip().startswith("---") and not parse_card(content.encode()) and "---\n---" not in content:
            return self._json({"errors": [{"message": "Invalid YAML metadata in README.md"}], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _list_repos(self, repo_type: str, token: Token | None) -> int:
        state = self.hub.state
        author, search = self._param("author"), (self._param("search") or "").lower()
        filters = self.query.get("filter", []) + self.query.get("filter[]", [])
        rows = []
        for repo in state.repos.values():
            if repo.repo_type != repo_type or (repo.private and not state.can_read_private(token, repo)):
                continue
            if author and repo.namespace != author:
                continue
            if search and search not in repo.repo_id.lower():
                continue
            info = views.repo_info(repo, repo.commits[repo.refs["main"]])
            if not all(f in info["tags"] or f == info.get("library_name") for f in filters):
                continue
            if self._param("gated") is not None and bool(repo.gated) != self._flag("gated"):
                continue
            rows.append(info)
        sort = self._param("sort")
        if sort:
            direction = self._param("direction", "-1")
            rows.sort(key=lambda r: (r.get(sort) is not None, r.get(sort) or 0), reverse=direction == "-1")
        limit = self._param("limit")
        rows = rows[: int(limit)] if limit else rows
        expand = self.query.get("expand") or self.query.get("expand[]")
        if expand:
            fields: tuple[str, ...] | list[str] = expand
        else:
            fields = views.FULL_FIELDS if self._flag("full") else views.LIST_FIELDS
            if self._flag("cardData"):
                fields = (*fields, "cardData")
        return self._json([views.pick(r, fields) for r in rows])

    # -- downloads --------------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, token: Token | None) -> int:
        state = self.hub.state
        repo = state.get_repo(repo_type, repo_id, token)
        if path not in UNGATED_FILES:
            state.check_gate(repo, token)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_oid(content)}"',
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = self.headers.get("Range")
        match = RANGE_RE.match(range_header.strip()) if range_header else None
        if match:
            size = len(content)
            start_s, end_s = match.groups()
            if start_s == "":  # suffix range: the last N bytes
                start, end = max(0, size - int(end_s or 0)), size - 1
            else:
                start, end = int(start_s), min(int(end_s) if end_s else size - 1, size - 1)
            if start >= size or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            content = content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            status = 206
        if self.command == "GET":
            repo.downloads += 1
        return self._send(status, content, "application/octet-stream", headers)
