"""Write routes of the local Hub: branches, preupload and the NDJSON commit (mixed into HubHandler)."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from .state import HubError, Repo, Token, git_blob_oid

if TYPE_CHECKING:
    from .server import HubServer


class UploadRoutes:
    """Needs the HubHandler plumbing: hub, body, _json, _flag, _commit_at, _require_write, _repo_url."""

    hub: HubServer
    body: bytes
    _json: Any
    _flag: Any
    _commit_at: Any
    _require_write: Any
    _repo_url: Any

    def _branch(self, method: str, repo: Repo, branch: str, token: Token | None) -> int:
        self._require_write(repo, token)
        if method == "POST":
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            payload = json.loads(self.body or b"{}")
            start = self._commit_at(repo, payload.get("startingPoint") or "main")
            repo.refs[branch] = start.oid
            return self._json({})
        if method == "DELETE":
            if branch not in repo.refs or branch == "main":
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.refs[branch]
            return self._json({})
        raise HubError(405, f"{method} not allowed on branches")

    # -- uploads ----------------------------------------------------------------------------------
    def _check_commit_rights(self, repo: Repo, token: Token | None) -> bool:
        """A commit to the repo needs write access; a pull request only a signed-in user. Returns create_pr."""
        create_pr = self._flag("create_pr")
        if not create_pr:
            self._require_write(repo, token)
        elif token is None:
            raise HubError(401, "You must be authenticated to open a pull request")
        return create_pr

    def _preupload(self, repo: Repo, revision: str, token: Token | None) -> int:
        create_pr = self._check_commit_rights(repo, token)
        existing = repo.resolve(revision)
        if existing is None and not create_pr:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = json.loads(self.body or b"{}").get("files", [])
        # "regular" for every file: contents come inline (base64) in the commit, no LFS/Xet storage needed.
        # `oid` is the git blob id of the current remote file: the client skips files whose local blob id equals it.
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(existing.files[f["path"]]) if existing and f["path"] in existing.files else None,
            }
            for f in files
        ]
        return self._json({"files": answer, "commitOid": existing.oid if existing else None})

    def _commit(self, repo: Repo, revision: str, token: Token | None) -> int:
        create_pr = self._check_commit_rights(repo, token)
        assert token is not None
        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                additions[value["path"]] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode())
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"] + ("/" if key == "deletedFolder" else ""))
            else:
                raise HubError(400, f"The local test hub stores no LFS objects ({key}); it answers "
                               "uploadMode 'regular' in preupload, so this should not happen")
        head = repo.resolve(revision)
        if head is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = header.get("parentCommit")
        if parent:
            parent_commit = repo.resolve(parent)
            if parent_commit is None:
                raise HubError(404, f"Invalid parent commit: {parent}", "RevisionNotFound")
            if not create_pr and parent_commit.oid != head.oid:
                raise HubError(412, f"A commit has happened since. Parent {parent} is not the head of {revision}")
        base = repo.resolve(parent).oid if parent else head.oid  # type: ignore[union-attr]
        title = header.get("summary") or "Upload files"
        ref = revision
        pr_url = None
        if create_pr:
            repo.pr_count += 1
            ref = f"refs/pr/{repo.pr_count}"
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.pr_count}"
        commit = self.hub.state.commit(repo, ref, additions, deletions, title, header.get("description", ""),
                                       token.user, parent=base)
        return self._json({
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        })
