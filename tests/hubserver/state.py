"""In-memory state of the local Hub test server: users, tokens, repos, branches and commits.

Every repo keeps full file snapshots per commit (the test repos are small), so any revision can be
served exactly. All access goes through `HubState.lock` because the HTTP server is threaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml

REPO_TYPES = ("model", "dataset", "space")
WRITE_ROLES = ("write", "admin", "contributor")


def git_blob_oid(content: bytes) -> str:
    """The git blob id (sha1 of `blob <len>\\0<content>`): what huggingface_hub compares for no-op files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Token:
    value: str
    user: str
    role: str  # "read" | "write" | "fineGrained"
    # fine-grained only: entity name (user or org) -> permissions like "repo.content.read", "repo.write"
    scoped: dict[str, list[str]] = field(default_factory=dict)
    can_read_gated: bool = True


@dataclass
class User:
    name: str
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> role in org ("write", "read", "admin")


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, bytes]  # full snapshot after this commit
    files_changed: list[str]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False  # False | "auto" | "manual"
    granted: set[str] = field(default_factory=set)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=iso_now)
    last_modified: str = field(default_factory=iso_now)
    downloads: int = 0
    likes: int = 0
    pr_count: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        """Branch, refs/pr/N, full commit oid or a 7+ character prefix of one."""
        oid = self.refs.get(revision)
        if oid is None and len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision):
            oid = next((o for o in self.commits if o.startswith(revision)), None)
        return self.commits.get(oid) if oid else None


class HubError(Exception):
    """An HTTP error answer: status, X-Error-Code (what huggingface_hub maps to exception classes)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.body = body or {}
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def parse_card(readme: bytes | None) -> dict[str, Any]:
    """YAML front matter of a README.md (what the Hub returns as cardData); {} when absent or invalid."""
    if not readme:
        return {}
    text = readme.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        return {}
    try:
        data = yaml.safe_load(parts[0][3:])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def derive_tags(repo: Repo, files: dict[str, bytes], card: dict[str, Any]) -> list[str]:
    """Tags the way the Hub derives them from the card: card tags, library, pipeline, license,
    `dataset:`, `base_model:<id>` and `base_model:<relation>:<id>` (relation from
    `base_model_relation`, else "adapter" for LoRA/peft repos, else "finetune")."""
    tags: list[str] = list(_as_list(card.get("tags")))
    for key in ("library_name", "pipeline_tag"):
        if card.get(key):
            tags.append(str(card[key]))
    if repo.repo_type == "model" and "safetensors" not in tags and any(p.endswith(".safetensors") for p in files):
        tags.append("safetensors")
    for license_name in _as_list(card.get("license")):
        tags.append(f"license:{license_name}")
    for dataset in _as_list(card.get("datasets")):
        tags.append(f"dataset:{dataset}")
    base_models = _as_list(card.get("base_model"))
    if base_models:
        relation = card.get("base_model_relation")
        if not relation:
            is_adapter = "lora" in tags or any(p.endswith("adapter_config.json") for p in files)
            relation = "adapter" if is_adapter else "finetune"
        for base in base_models:
            tags.append(f"base_model:{base}")
            tags.append(f"base_model:{relation}:{base}")
    tags.append("region:us")
    return list(dict.fromkeys(tags))


class HubState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users: dict[str, User] = {}
        self.tokens: dict[str, Token] = {}
        self.repos: dict[tuple[str, str], Repo] = {}
        self._counter = itertools.count(1)

    # -- users and tokens -------------------------------------------------------------------------
    def add_user(
        self,
        name: str,
        token: str,
        role: str = "write",
        orgs: tuple[str, ...] | dict[str, str] = (),
        scoped: dict[str, list[str]] | None = None,
    ) -> None:
        if role not in ("read", "write", "fineGrained"):
            raise ValueError(f"token role must be read, write or fineGrained, got {role!r}")
        with self.lock:
            user = self.users.setdefault(name, User(name))
            org_roles = orgs if isinstance(orgs, dict) else {org: "write" for org in orgs}
            user.orgs.update(org_roles)
            if role == "fineGrained" and scoped is None:
                scoped = {name: ["repo.content.read", "repo.write"]}
            self.tokens[token] = Token(token, name, role, scoped or {})

    def token_user(self, token: str | None) -> Token | None:
        """None for anonymous; raises 401 for an unknown token (like the Hub)."""
        if token is None:
            return None
        found = self.tokens.get(token)
        if found is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return found

    def is_member(self, user: str, namespace: str) -> bool:
        return user == namespace or namespace in self.users.get(user, User(user)).orgs

    def can_write(self, token: Token | None, namespace: str) -> bool:
        if token is None or not self.is_member(token.user, namespace):
            return False
        if token.user != namespace and self.users[token.user].orgs.get(namespace) not in WRITE_ROLES:
            return False
        if token.role == "write":
            return True
        if token.role == "fineGrained":
            return "repo.write" in token.scoped.get(namespace, [])
        return False

    def can_read_private(self, token: Token | None, repo: Repo) -> bool:
        if token is None or not self.is_member(token.user, repo.namespace):
            return False
        if token.role == "fineGrained":
            return bool({"repo.content.read", "repo.write"} & set(token.scoped.get(repo.namespace, [])))
        return True

    # -- repos --------------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str, token: Token | None) -> Repo:
        """The repo if this token may see it; RepoNotFound otherwise (401 anonymous, 404 with a token)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.can_read_private(token, repo)):
            status = 401 if token is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def check_gate(self, repo: Repo, token: Token | None) -> None:
        """GatedRepo (401 anonymous, 403 not granted) unless the user accepted the license or is a member."""
        if not repo.gated:
            return
        if token is not None and (self.is_member(token.user, repo.namespace) or token.user in repo.granted):
            if token.role != "fineGrained" or token.can_read_gated or self.is_member(token.user, repo.namespace):
                return
        if token is None:
            raise HubError(401, f"Access to model {repo.repo_id} is restricted. You must be authenticated.", "GatedRepo")
        raise HubError(
            403,
            f"Access to {repo.repo_type} {repo.repo_id} is restricted and you are not in the authorized list. "
            f"Visit {repo.repo_id} to ask for access.",
            "GatedRepo",
        )

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> tuple[Repo, bool]:
        """Returns (repo, created). New repos get an initial commit with .gitattributes like the Hub."""
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key], False
            repo = Repo(repo_type, repo_id, private=private)
            self.repos[key] = repo
            self.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                        [], "initial commit", "", author)
            return repo, True

    def commit(
        self,
        repo: Repo,
        ref: str,
        additions: dict[str, bytes],
        deletions: list[str],
        title: str,
        message: str,
        author: str,
        parent: str | None = None,
    ) -> Commit:
        """Apply additions and deletions (file paths or folders ending in "/") on top of `parent`
        (default: the head of `ref`) and move `ref` to the new commit."""
        with self.lock:
            parent = parent if parent is not None else repo.refs.get(ref)
            files = dict(repo.commits[parent].files) if parent else {}
            changed: list[str] = []
            for path in deletions:
                folder = path.rstrip("/") + "/"
                doomed = [p for p in files if p == path or p.startswith(folder)]
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
                    changed.append(p)
            for path, content in additions.items():
                if files.get(path) != content:
                    changed.append(path)
                files[path] = content
            seed = f"{repo.repo_type}/{repo.repo_id}|{parent}|{title}|{next(self._counter)}|{sorted(changed)}"
            oid = hashlib.sha1(seed.encode()).hexdigest()
            commit = Commit(oid, parent, title, message, author, iso_now(), files, changed)
            repo.commits[oid] = commit
            repo.refs[ref] = oid
            repo.last_modified = commit.date
            return commit
