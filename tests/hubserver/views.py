"""JSON shapes of Hub API answers, as huggingface_hub 2.4 parses them (hf_api.ModelInfo, DatasetInfo,
RepoFile/RepoFolder, whoami-v2, GitCommitInfo)."""

from __future__ import annotations

import hashlib
from typing import Any

from .state import Commit, HubState, Repo, Token, derive_tags, git_blob_oid, parse_card

# Fields of a repo listing without `full` (what /api/models returns by default).
LIST_FIELDS = ("id", "_id", "author", "private", "likes", "downloads", "tags", "pipeline_tag", "library_name",
               "createdAt")
FULL_FIELDS = LIST_FIELDS + ("sha", "lastModified", "gated", "disabled", "siblings")


def repo_info(repo: Repo, commit: Commit) -> dict[str, Any]:
    """Everything /api/{type}s/{id} can return; callers pick fields for listings and `expand`."""
    card = parse_card(commit.files.get("README.md"))
    info: dict[str, Any] = {
        "_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.namespace,
        "sha": commit.oid,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": repo.gated,
        "disabled": False,
        "downloads": repo.downloads,
        "likes": repo.likes,
        "tags": derive_tags(repo, commit.files, card),
        "cardData": card,
        "siblings": [
            {"rfilename": path, "size": len(content), "blobId": git_blob_oid(content)}
            for path, content in sorted(commit.files.items())
        ],
        "usedStorage": sum(len(c) for c in commit.files.values()),
    }
    if repo.repo_type == "model":
        info["library_name"] = card.get("library_name")
        info["pipeline_tag"] = card.get("pipeline_tag")
        info["modelId"] = repo.repo_id
    return info


def pick(info: dict[str, Any], fields: tuple[str, ...] | list[str]) -> dict[str, Any]:
    picked = {key: info[key] for key in fields if key in info}
    picked["id"] = info["id"]
    return picked


def tree_entries(commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]] | None:
    """Files and folders under `path` (None when `path` is neither), folders before files like the Hub."""
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    if path.strip("/") in commit.files:
        content = commit.files[path.strip("/")]
        return [file_entry(path.strip("/"), content)]
    below = {p: c for p, c in commit.files.items() if p.startswith(prefix)}
    if not below:
        return None
    folders: set[str] = set()
    files: list[dict[str, Any]] = []
    for p, content in sorted(below.items()):
        parts = p[len(prefix):].split("/")
        if recursive or len(parts) == 1:
            files.append(file_entry(p, content))
        # every intermediate folder (only the first level when not recursive)
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        for i in range(1, depth + 1):
            folders.add(prefix + "/".join(parts[:i]))
    return [folder_entry(f, commit) for f in sorted(folders)] + files


def file_entry(path: str, content: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}


def folder_entry(path: str, commit: Commit) -> dict[str, Any]:
    oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def path_info(commit: Commit, path: str) -> dict[str, Any] | None:
    path = path.strip("/")
    if path in commit.files:
        return file_entry(path, commit.files[path])
    if any(p.startswith(path + "/") for p in commit.files):
        return folder_entry(path, commit)
    return None


def whoami(state: HubState, token: Token) -> dict[str, Any]:
    user = state.users[token.user]
    access_token: dict[str, Any] = {
        "displayName": f"{token.user}-{token.role}",
        "role": token.role,
        "createdAt": "2026-01-01T00:00:00.000Z",
    }
    if token.role == "fineGrained":
        access_token["fineGrained"] = {
            "canReadGatedRepos": token.can_read_gated,
            "global": [],
            "scoped": [
                {"entity": {"_id": entity, "type": "org" if entity != token.user else "user", "name": entity},
                 "permissions": perms}
                for entity, perms in token.scoped.items()
            ],
        }
    return {
        "type": "user",
        "id": hashlib.md5(user.name.encode()).hexdigest()[:24],
        "name": user.name,
        "fullname": user.name.capitalize(),
        "email": f"{user.name}@example.test",
        "emailVerified": True,
        "canPay": False,
        "isPro": False,
        "periodEnd": None,
        "avatarUrl": "",
        "orgs": [
            {"type": "org", "id": hashlib.md5(org.encode()).hexdigest()[:24], "name": org, "fullname": org,
             "email": None, "canPay": False, "periodEnd": None, "avatarUrl": "", "roleInOrg": role,
             "isEnterprise": False}
            for org, role in sorted(user.orgs.items())
        ],
        "auth": {"type": "access_token", "accessToken": access_token},
    }


def commit_json(commit: Commit) -> dict[str, Any]:
    """One entry of /api/{type}s/{id}/commits/{rev} (huggingface_hub GitCommitInfo)."""
    return {
        "id": commit.oid,
        "authors": [{"user": commit.author}],
        "date": commit.date,
        "title": commit.title,
        "message": commit.message,
    }
