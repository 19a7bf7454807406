"""Checkpoints that outlive the machine: every checkpoint, in full, on a branch of the adapter repo.

With ``hub.resume_branch`` set (``sd35hub train --on hf-jobs`` sets it to ``resume``), each checkpoint
the trainer writes is committed as it is written to that branch of ``hub.repo_id``:

    <repo_id>@resume/
        checkpoint-000200/   lora.safetensors, ema.safetensors, training_state.pt, state.json, adapter/...
        checkpoint-000300/   (the newest train.keep_checkpoints are kept; older ones deleted in the same commit)
        metrics.jsonl        the run's metric records so far (the loss curve continues after a resume)

``train.resume=latest`` on a machine with no local checkpoint (a new job) downloads the newest one from
the branch into the checkpoint folder and resumes from it; the trainer's resume is exact, so the final
adapter equals that of a run that was never interrupted. training_state.pt is loaded with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sd35hub.access import hub_errors

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^(checkpoint-(\d+))/state\.json$")
METRICS_FILE = "metrics.jsonl"


def remote_checkpoints(repo_id: str, branch: str, *, token: str | bool | None = None) -> list[str]:
    """Complete checkpoint folders on ``repo_id@branch``, oldest first ([] when the repo or branch is missing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    with hub_errors(repo_id, token=token, what=f"reading the checkpoints on {repo_id}@{branch}"):
        try:
            files = HfApi(token=token).list_repo_files(repo_id, revision=branch, token=token)
        except (RevisionNotFoundError, RepositoryNotFoundError):  # nothing pushed yet
            return []
    found = sorted((int(m.group(2)), m.group(1)) for f in files if (m := _CHECKPOINT.match(f)))
    return [name for _, name in found]


def push_checkpoint(checkpoint: Path, repo_id: str, *, branch: str, keep: int, metrics: Path | None = None,
                    private: bool = False, token: str | bool | None = None) -> str:
    """Commit one checkpoint folder (and the metrics so far) to ``repo_id@branch``; older checkpoints beyond
    the newest ``keep`` are deleted in the same commit. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from sd35hub.hub.publish import PlannedFile, commit_once, with_retries

    api = HfApi(token=token)
    checkpoint = Path(checkpoint)
    with hub_errors(repo_id, token=token, what=f"pushing a checkpoint to {repo_id}@{branch}", write=True):
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, token=token), "create_repo")
        with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True, token=token), "create_branch")
        existing = [name for name in remote_checkpoints(repo_id, branch, token=token) if name != checkpoint.name]
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=f"{checkpoint.name}/{path.relative_to(checkpoint).as_posix()}",
                               path_or_fileobj=path.read_bytes())
            for path in sorted(checkpoint.rglob("*")) if path.is_file()
        ]  # fmt: skip
        if metrics is not None and metrics.is_file():
            operations.append(CommitOperationAdd(path_in_repo=METRICS_FILE, path_or_fileobj=metrics.read_bytes()))
        stale = existing[: max(0, len(existing) - (keep - 1))]
        operations += [CommitOperationDelete(path_in_repo=f"{name}/", is_folder=True) for name in stale]
        # commit_once: a commit whose answer is lost is found on the branch instead of being made twice
        added = [PlannedFile(op.path_in_repo, op.path_or_fileobj, "checkpoint") for op in operations
                 if isinstance(op, CommitOperationAdd)]
        info = commit_once(api, repo_id, operations, f"sd35hub checkpoint {checkpoint.name}", branch, added, token)
    return str(info.commit_url)


def pull_latest_checkpoint(repo_id: str, *, branch: str, checkpoint_dir: Path, logs_dir: Path | None = None,
                           token: str | bool | None = None) -> Path | None:
    """Download the newest checkpoint of ``repo_id@branch`` into ``checkpoint_dir`` (atomically: a temp
    folder renamed into place) and the metrics into ``logs_dir`` when it has none. None when there is none."""
    from huggingface_hub import snapshot_download

    names = remote_checkpoints(repo_id, branch, token=token)
    if not names:
        return None
    name = names[-1]
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=checkpoint_dir))
    try:
        with hub_errors(repo_id, token=token, what=f"downloading {name} from {repo_id}@{branch}"):
            snapshot_download(repo_id, revision=branch, allow_patterns=[f"{name}/*", METRICS_FILE], local_dir=staging,
                              token=token)
        final = checkpoint_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / name, final)
        if logs_dir is not None and (staging / METRICS_FILE).is_file() and not (Path(logs_dir) / METRICS_FILE).exists():
            Path(logs_dir).mkdir(parents=True, exist_ok=True)
            os.replace(staging / METRICS_FILE, Path(logs_dir) / METRICS_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# ------------------------------------------------------------------------ trainer hooks (recipe.py)
def fetch_for_resume(trainer: Any) -> None:
    """train.resume=latest with hub.resume_branch: no local checkpoint -> the branch's newest (one download
    per machine; the other processes of the machine wait, then read it)."""
    from sd35hub.train import checkpoint as ckpt

    hub = trainer.config.hub
    if not (hub.resume_branch and hub.repo_id):
        return
    with trainer.acc.local_main_process_first():
        if trainer.acc.is_local_main_process and ckpt.resolve_resume("latest", trainer.checkpoint_dir) is None:
            path = pull_latest_checkpoint(hub.repo_id, branch=hub.resume_branch, checkpoint_dir=trainer.checkpoint_dir,
                                          logs_dir=trainer.output_dir / "logs")
            if trainer.main:
                trainer.log(f"resume=latest: fetched {path.name if path else 'nothing'} from "
                            f"{hub.repo_id}@{hub.resume_branch}")


def push_after_save(trainer: Any, path: Path) -> None:
    """After the main process wrote ``path``: push it to hub.resume_branch (when set)."""
    hub = trainer.config.hub
    if not (hub.resume_branch and hub.repo_id):
        return
    from sd35hub.errors import Sd35HubError

    try:
        url = push_checkpoint(path, hub.repo_id, branch=hub.resume_branch, keep=trainer.config.train.keep_checkpoints,
                              metrics=trainer.output_dir / "logs" / METRICS_FILE, private=hub.private)
    except Sd35HubError as exc:  # like hub.push_checkpoints (#15 item 10): warn, keep training, push the next one
        logger.warning("Could not push %s to %s@%s: %s Training continues; the next checkpoint is pushed again.",
                       path.name, hub.repo_id, hub.resume_branch, exc)
        trainer.log(f"checkpoint {path.name} NOT pushed to {hub.repo_id}@{hub.resume_branch} (see the warning); "
                    "training continues")
        return
    trainer.log(f"checkpoint {path.name} pushed to {hub.repo_id}@{hub.resume_branch} ({url})")
