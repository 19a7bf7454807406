"""Publish a training output folder to a Hub model repo in one commit.

Order matters: the write permission is checked first (one whoami call), then the plan is built
from small files, then only the files whose content differs from the remote are committed, in one
commit whose parent is the remote head we compared against (so a retried commit cannot land
twice). The repo layout:

    pytorch_lora_weights.safetensors   the adapter, at the root: load_lora_weights("owner/repo") finds it
    README.md                          model card (sd35hub.hub.card) with links into images/
    images/*.png                       validation images and the loss plot
    sd35hub_config.yaml                the training config without local paths or secrets

Checkpoints, optimizer state, caches and logs are never planned: only the files above are read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from sd35hub.access import check_write_access, hub_errors
from sd35hub.errors import AdapterError, ConfigError, HubRequestError, Sd35HubError
from sd35hub.hub.card import ADAPTER_FILE_IN_REPO, CardInfo, adapter_bytes, build_model_card, repo_image_path
from sd35hub.redact import sanitized_config_yaml

logger = logging.getLogger(__name__)

CONFIG_FILE_IN_REPO = "sd35hub_config.yaml"
COMMIT_ATTEMPTS = 4  # one try + 3 retries on 5xx / 429 / timeouts
RETRY_BASE_WAIT_S = 0.5  # doubles each retry, capped at RETRY_MAX_WAIT_S
RETRY_MAX_WAIT_S = 8.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class PlannedFile:
    path_in_repo: str
    content: bytes
    source: str  # where it comes from, for the plan printout ("adapter/...", "generated")

    @property
    def size(self) -> int:
        return len(self.content)

    @cached_property  # hashed once: the adapter can be hundreds of MB and is compared repeatedly
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def git_oid(self) -> str:
        """The git blob id the Hub reports for a non-LFS file with this content."""
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class PublishResult:
    repo_id: str
    revision: str
    dry_run: bool
    planned: list[str]  # every file of the publication, in repo paths
    uploaded: list[str] = field(default_factory=list)  # sent in the commit (or, dry run: would be)
    unchanged: list[str] = field(default_factory=list)  # identical on the Hub: not sent
    commit_url: str | None = None  # None when nothing changed or dry run
    pr_url: str | None = None
    card: str = ""  # README.md text
    sizes: dict[str, int] = field(default_factory=dict)

    def describe(self) -> list[str]:
        """Human-readable lines (the CLI prints them)."""
        verb = "Would upload" if self.dry_run else "Uploaded"
        lines = [f"{'Plan for' if self.dry_run else 'Published'} {self.repo_id} (revision {self.revision}):"]
        for path in self.planned:
            state = "unchanged" if path in self.unchanged else ("upload" if self.dry_run else "uploaded")
            lines.append(f"  {path:<40} {self.sizes.get(path, 0):>10} B  {state}")
        lines.append(f"{verb} {len(self.uploaded)} file(s); {len(self.unchanged)} unchanged.")
        if self.pr_url:
            lines.append(f"Pull request: {self.pr_url}")
        elif self.commit_url:
            lines.append(f"Commit: {self.commit_url}")
        elif not self.dry_run:
            lines.append("Nothing changed since the last publication: no commit made.")
        return lines


def plan_publication(output_dir: str | Path, repo_id: str, base_model_id: str | None = None) -> tuple[list[PlannedFile], str]:
    """(files to publish, card text) for a training output folder. Reads only the files it publishes,
    and only files inside the folder: summary.json naming anything outside it is refused (ConfigError),
    and so is a malformed summary.json (sd35hub.hub.publish_checks). ``base_model_id``: the Hub repo of
    a run trained on a local folder (card and adapter header)."""
    from sd35hub.hub.publish_checks import check_summary, inside

    output_dir = Path(output_dir)
    info = CardInfo.from_output_dir(output_dir, base_model_id=base_model_id, summary=check_summary(output_dir))
    adapter = inside(output_dir, info.adapter_file, "adapter_file")
    if not adapter.is_file():
        raise ConfigError(f"{output_dir} has no adapter file {info.adapter_file}: did training finish?")
    _check_safetensors(adapter)
    card_text = str(build_model_card(info, repo_id=repo_id))
    files = [
        PlannedFile(ADAPTER_FILE_IN_REPO, adapter_bytes(adapter, base_model_id), info.adapter_file),
        PlannedFile("README.md", card_text.encode("utf-8"), "generated model card"),
    ]
    if info.embeddings and isinstance(info.embeddings.get("file"), str):  # pivotal tuning: next to the adapter
        from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, dims_for_variant, read_embeddings

        embeddings = inside(output_dir, info.embeddings["file"], "embeddings.file")
        read_embeddings(embeddings, dims=dims_for_variant(info.resolved_variant))  # a bad file is refused, not sent
        files.append(PlannedFile(EMBEDDINGS_FILE, embeddings.read_bytes(), info.embeddings["file"]))
    images = [image.path for image in info.validation_images] + ([info.loss_plot] if info.loss_plot else [])
    for local in dict.fromkeys(images):  # de-duplicated, in card order
        files.append(PlannedFile(repo_image_path(local), inside(output_dir, local, "image").read_bytes(), local))
    config = output_dir / "training_config.yaml"
    if config.is_file():
        config = inside(output_dir, "training_config.yaml", "training config")
        text = sanitized_config_yaml(config.read_text(encoding="utf-8"))
        files.append(PlannedFile(CONFIG_FILE_IN_REPO, text.encode("utf-8"), "training_config.yaml (sanitized)"))
    return files, card_text


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as adapter:
            keys = list(adapter.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable .safetensors file ({exc}); retrain or re-save it.") from exc
    if not keys:
        raise AdapterError(f"{path} holds no tensors; it is not a trained adapter.")


def _remote_oids(api: Any, repo_id: str, revision: str, token: str | bool | None) -> tuple[dict[str, set[str]], str | None]:
    """({path: {git oid, lfs sha256}}, head commit oid) of the remote revision; ({}, None) if it has none."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        head = api.repo_info(repo_id, revision=revision, token=token).sha
        entries = api.list_repo_tree(repo_id, revision=revision, recursive=True, token=token)
        oids: dict[str, set[str]] = {}
        for entry in entries:
            if hasattr(entry, "blob_id"):
                ids = {entry.blob_id}
                if getattr(entry, "lfs", None) is not None:
                    ids.add(entry.lfs.sha256)
                oids[entry.path] = ids
        return oids, head
    except (RevisionNotFoundError, RepositoryNotFoundError):
        return {}, None


def _is_transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    from sd35hub.hubhttp import RETRY_STATUS, httpx_module

    httpx2 = httpx_module()

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status in RETRY_STATUS
    return isinstance(exc, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))


def _wait_before_retry(exc: BaseException, attempt: int, what: str) -> bool:
    """Sleep before retry ``attempt``: the Hub's Retry-After when it sent one, else exponential backoff.
    False (no sleep): the Hub asked for a longer pause than sd35hub waits (hubhttp.MAX_RETRY_AFTER_S)."""
    from sd35hub import hubhttp

    response = getattr(exc, "response", None)
    asked = hubhttp.retry_after_s(response.headers) if response is not None else None
    if asked is not None and asked > hubhttp.MAX_RETRY_AFTER_S:
        return False
    wait = asked if asked is not None else min(RETRY_BASE_WAIT_S * 2 ** (attempt - 1), RETRY_MAX_WAIT_S)
    logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, type(exc).__name__, attempt,
                   COMMIT_ATTEMPTS - 1, wait)
    time.sleep(wait)
    return True


def with_retries(action: Callable[[], _T], what: str) -> _T:
    """Run ``action``; retry transient Hub failures with exponential backoff (or the Hub's Retry-After),
    re-raise the rest. Only for actions that are safe to repeat (create_repo/create_branch with exist_ok)."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return action()
        except Exception as exc:
            if not _is_transient(exc) or attempt == COMMIT_ATTEMPTS or not _wait_before_retry(exc, attempt, what):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def publish(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    base_model_id: str | None = None,
) -> PublishResult:
    """Publish OUTPUT_DIR to ``repo_id`` in one commit (see the module docstring for the layout).

    Raises NotLoggedInError / WritePermissionError before reading anything big, ConfigError /
    AdapterError for an incomplete output folder, HubRequestError when the Hub keeps failing (the
    repo is then unchanged: the commit is atomic).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_write_access(repo_id, token=token)
    files, card_text = plan_publication(output_dir, repo_id, base_model_id)
    branch = revision or "main"
    api = HfApi(token=token)
    result = PublishResult(
        repo_id=repo_id, revision=branch, dry_run=dry_run, planned=[f.path_in_repo for f in files],
        card=card_text, sizes={f.path_in_repo: f.size for f in files},
    )
    with hub_errors(repo_id, token=token, what=f"publishing to {repo_id}", write=True):
        # reads are retried by huggingface_hub's client (sd35hub.hubhttp); writes below by with_retries/commit_once
        remote, head = _remote_oids(api, repo_id, branch, token)
        if head is None and branch != "main":  # a new branch starts as a copy of main: compare with main
            remote, _ = _remote_oids(api, repo_id, "main", token)
        changed = [f for f in files if not ({f.git_oid, f.sha256} & remote.get(f.path_in_repo, set()))]
        result.uploaded = [f.path_in_repo for f in changed]
        result.unchanged = [f.path_in_repo for f in files if f not in changed]
        for line in result.describe():
            logger.info(line)
        if dry_run or not changed:
            return result
        if head is None:
            with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, token=token), "create_repo")
        if branch != "main" and head is None:
            with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True, token=token), "create_branch")
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.content) for f in changed]
        message = commit_message or f"Publish LoRA adapter with sd35hub ({len(changed)} file(s))"
        info = commit_once(api, repo_id, operations, message, branch, changed, token, create_pr=create_pr,
                           expected_head=head)
    result.commit_url = info.commit_url if info is not None else None
    result.pr_url = getattr(info, "pr_url", None) if info is not None else None
    return result


def commit_once(
    api: Any, repo_id: str, operations: list[Any], message: str, branch: str, changed: list[PlannedFile],
    token: str | bool | None, *, create_pr: bool = False, expected_head: str | None = None,
) -> Any:
    """create_commit, retried on transient failures, that never commits twice.

    The commit names the head it was planned against as its parent (``expected_head``, else the head
    read now), so the Hub refuses it (412) if the branch moved. When an attempt fails without an answer
    (dropped connection, timeout, 5xx), the repo is read before retrying: if the head moved to a commit
    holding our files (a pull request holding them, for ``create_pr``), that attempt landed and is the
    result; if it moved otherwise, someone else pushed (HubRequestError); if not, the commit is retried."""
    from huggingface_hub.errors import HfHubHTTPError

    head = _head(api, repo_id, branch, token)
    if expected_head is not None and head != expected_head:
        raise _moved(repo_id)
    prs = _pull_requests(api, repo_id, token) if create_pr else None
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return api.create_commit(
                repo_id, operations, commit_message=message, revision=branch, create_pr=create_pr,
                parent_commit=None if create_pr else head, token=token,
            )
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 412:
                landed = _landed(api, repo_id, branch, head, prs, changed, token) if attempt > 1 else None
                if landed is not None:
                    return landed
                raise _moved(repo_id) from exc
            if not _is_transient(exc) or attempt == COMMIT_ATTEMPTS:
                raise
            failure: Exception = exc
        except Exception as exc:
            if not _is_transient(exc) or attempt == COMMIT_ATTEMPTS:
                raise
            failure = exc
        if not _wait_before_retry(failure, attempt, f"commit to {repo_id}@{branch}"):
            raise failure
        landed = _landed(api, repo_id, branch, head, prs, changed, token)
        if landed is not None:
            logger.info("the commit to %s@%s had landed (its answer was lost): not committing again", repo_id, branch)
            return landed
    raise AssertionError("unreachable")  # pragma: no cover


def _moved(repo_id: str) -> HubRequestError:
    return HubRequestError(f"{repo_id} changed on the Hub while publishing (someone else pushed). Run publish again.")


def _head(api: Any, repo_id: str, branch: str, token: str | bool | None) -> str:
    return str(api.repo_info(repo_id, revision=branch, token=token).sha)


def _pull_requests(api: Any, repo_id: str, token: str | bool | None) -> dict[str, str]:
    refs = api.list_repo_refs(repo_id, include_pull_requests=True, token=token)
    return {ref.ref: ref.target_commit for ref in refs.pull_requests or []}


def _holds(api: Any, repo_id: str, revision: str, changed: list[PlannedFile], token: str | bool | None) -> bool:
    remote, _ = _remote_oids(api, repo_id, revision, token)
    return all({f.git_oid, f.sha256} & remote.get(f.path_in_repo, set()) for f in changed)


def _landed(
    api: Any, repo_id: str, branch: str, head: str, prs: dict[str, str] | None, changed: list[PlannedFile],
    token: str | bool | None,
) -> _LandedCommit | None:
    """The commit an earlier attempt made, if it landed; None if nothing landed; HubRequestError if the
    branch moved to someone else's commit. ``prs``: the pull requests before the first attempt (None:
    not a pull request)."""
    endpoint = str(getattr(api, "endpoint", "") or "").rstrip("/")
    if prs is not None:
        for ref, oid in _pull_requests(api, repo_id, token).items():
            if ref not in prs and _holds(api, repo_id, oid, changed, token):
                number = ref.rsplit("/", 1)[-1]
                return _LandedCommit(f"{endpoint}/{repo_id}/commit/{oid}", f"{endpoint}/{repo_id}/discussions/{number}")
        return None
    new_head = _head(api, repo_id, branch, token)
    if new_head == head:
        return None
    if _holds(api, repo_id, new_head, changed, token):
        return _LandedCommit(f"{endpoint}/{repo_id}/commit/{new_head}")
    raise _moved(repo_id)


@dataclass(frozen=True)
class _LandedCommit:
    commit_url: str
    pr_url: str | None = None


def publish_checkpoint_adapter(
    adapter_path: str | Path,
    repo_id: str,
    *,
    branch: str = "checkpoints",
    step: int,
    private: bool = False,
    token: str | bool | None = None,
) -> str:
    """Push one checkpoint's adapter to ``branch`` (root ``pytorch_lora_weights.safetensors``, one commit
    per step, so ``load_lora_weights(repo, revision=<commit>)`` gets any step), with the pivotal
    ``embeddings.safetensors`` beside it when there is one (checked first). Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, FILE_KEYS, read_embeddings

    check_write_access(repo_id, token=token)
    adapter_path = Path(adapter_path)
    _check_safetensors(adapter_path)
    embeddings = adapter_path.parent / EMBEDDINGS_FILE
    extra: list[PlannedFile] = []
    if embeddings.is_file():
        read_embeddings(embeddings, dims=dict.fromkeys(FILE_KEYS))  # a bad file is refused, not uploaded
        extra.append(PlannedFile(EMBEDDINGS_FILE, embeddings.read_bytes(), str(embeddings)))
    api = HfApi(token=token)
    with hub_errors(repo_id, token=token, what=f"publishing to {repo_id}", write=True):
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, token=token), "create_repo")
        with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True, token=token), "create_branch")
        content = adapter_path.read_bytes()
        planned = [PlannedFile(ADAPTER_FILE_IN_REPO, content, str(adapter_path)), *extra]
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.content) for f in planned]
        info = commit_once(api, repo_id, operations, f"Checkpoint adapter at step {step}", branch, planned, token)
    return str(info.commit_url)


def push_checkpoint(
    adapter_path: str | Path,
    repo_id: str,
    *,
    step: int,
    branch: str = "checkpoints",
    private: bool = False,
    token: str | bool | None = None,
) -> str | None:
    """``publish_checkpoint_adapter`` for the training loop: a failed push (Hub down, token revoked,
    rate limit...) is a warning, not the end of the run. Training keeps going, and the next checkpoint
    pushes again (its adapter holds everything this one had). Returns the commit URL, None on failure."""
    try:
        return publish_checkpoint_adapter(adapter_path, repo_id, branch=branch, step=step, private=private, token=token)
    except Sd35HubError as exc:
        logger.warning("Could not push the checkpoint of step %d to %s@%s: %s Training continues; the next "
                       "checkpoint is pushed again.", step, repo_id, branch, exc)
        return None
