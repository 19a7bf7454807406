"""The Space's training page, minus the UI (space/train_page.py draws it): a visitor's choices -> a job plan
on Hugging Face Jobs with *their* token -> the job -> its progress. Nothing trains on the Space's hardware.

The visitor's token is passed explicitly to every call (never read from or written to the process
environment, which all sessions share) and reaches the job only as its HF_TOKEN secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sd35hub.config import as_overrides
from sd35hub.errors import ConfigError

# Starting points by use case (docs: PRODUCT presets): rank, epochs, learning rate.
PRESETS: dict[str, dict[str, Any]] = {
    "style": {"lora.rank": 16, "train.epochs": 10, "train.learning_rate": 1e-4},
    "subject": {"lora.rank": 32, "train.epochs": 15, "train.learning_rate": 5e-5},
    "concept": {"lora.rank": 64, "train.epochs": 20, "train.learning_rate": 3e-5},
}
FLAVORS = ("t4-small", "l4x1", "a100-large", "h200")
TIMEOUTS = ("1h", "3h", "6h")


@dataclass(frozen=True)
class TrainingRequest:
    dataset: str  # Hub dataset id
    base_model: str  # Hub id (or "tiny" in tests)
    trigger_word: str
    preset: str  # key of PRESETS
    repo_id: str  # where the adapter is published
    flavor: str = "a100-large"
    timeout: str = "3h"
    resolution: int = 1024
    steps: int = 0  # 0: the preset's epochs
    extra: str = ""  # advanced: one section.key=value per line
    resume: bool = False  # continue from the newest checkpoint on the repo's resume branch


def overrides(request: TrainingRequest) -> list[str]:
    """Dotted overrides for `plan_job`; every problem with the request reported at once."""
    problems = []
    if request.preset not in PRESETS:
        problems.append(f"preset {request.preset!r} is not one of {', '.join(PRESETS)}")
    if not request.dataset.strip() or request.dataset.count("/") != 1:
        problems.append("dataset: give the Hub id of your dataset, OWNER/NAME")
    if not request.repo_id.strip() or request.repo_id.count("/") != 1:
        problems.append("publish to: give the model repo for the adapter, OWNER/NAME")
    extra = [line.strip() for line in request.extra.splitlines() if line.strip() and not line.strip().startswith("#")]
    for line in extra:
        if "=" not in line or "." not in line.split("=", 1)[0]:
            problems.append(f"extra setting {line!r} must look like section.key=value")
    if problems:
        raise ConfigError(problems)
    values: dict[str, Any] = {
        "model.name": request.base_model.strip(), "data.source": request.dataset.strip(),
        "data.resolution": request.resolution, "hub.repo_id": request.repo_id.strip(), **PRESETS[request.preset],
    }  # fmt: skip
    if request.trigger_word.strip():
        values["data.trigger_word"] = request.trigger_word.strip()
    if request.steps:
        values["train.max_steps"] = int(request.steps)
    return as_overrides(values) + extra


def plan(request: TrainingRequest, token: str | None) -> Any:
    """The job plan (sd35hub.workflows.jobs.plan_job) with the visitor's token: access, memory plan, price."""
    from sd35hub.errors import NotLoggedInError
    from sd35hub.workflows.jobs import plan_job

    if not token:
        raise NotLoggedInError("training on Hugging Face Jobs")
    return plan_job(None, overrides(request), flavor=request.flavor, timeout=request.timeout, token=token,
                    resume="latest" if request.resume else None, labels={"sd35hub_from": "space"})


def start(job_plan: Any, token: str | None) -> dict[str, str]:
    """Submit the planned job; what the page keeps in the session: id, url, repo."""
    from sd35hub.workflows.jobs import submit

    job = submit(job_plan, token=token)
    return {"id": job.id, "url": job.url, "repo_id": job_plan.repo_id}


def progress(job: dict[str, str], token: str | None) -> dict[str, Any]:
    """Stage, step / total, loss, samples/s and, once completed, the published adapter's page."""
    from sd35hub.access import hub_endpoint
    from sd35hub.workflows.job_status import status

    report = status(job["id"], token=token)
    metrics = report.metrics or {}
    out: dict[str, Any] = {"stage": report.stage, "message": report.message, "url": report.url,
                           "step": metrics.get("step"), "total": metrics.get("total_steps"),
                           "loss": metrics.get("loss"), "samples_per_s": metrics.get("samples_per_s")}  # fmt: skip
    if report.stage == "COMPLETED":
        out["adapter_url"] = f"{hub_endpoint()}/{job['repo_id']}"
    return out


MAX_UPLOAD_FILES = 500
MAX_UPLOAD_BYTES = 20 * 1024**2  # per file


@dataclass
class UploadResult:
    repo_id: str
    images: int
    captions: int
    skipped: dict[str, int]  # reason -> count (names are untrusted: never echoed back)

    def describe(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (f"{self.images} images ({self.captions} with a caption) uploaded to the private dataset {self.repo_id}"
                + (f"; skipped: {skipped}" if skipped else ""))


def upload_dataset(files: list[tuple[str, bytes]], repo_id: str, token: str | None) -> UploadResult:
    """A visitor's images (and same-name ``.txt`` captions) -> a **private** dataset repo in the imagefolder
    layout ``images/NNNN.<ext>`` + ``metadata.jsonl`` (file_name, text), one commit. File names are untrusted:
    only the extension and the pairing of image and caption are kept. Bad files are counted and skipped."""
    from pathlib import PurePosixPath

    from huggingface_hub import CommitOperationAdd, HfApi

    from sd35hub.access import hub_errors
    from sd35hub.data.images import IMAGE_EXTENSIONS, clean_caption, decode_caption, decode_image
    from sd35hub.errors import DatasetError, NotLoggedInError
    from sd35hub.hub.publish import with_retries

    if not token:
        raise NotLoggedInError("uploading a dataset")
    if not repo_id.strip() or repo_id.count("/") != 1:
        raise ConfigError("new dataset: give its repo id, OWNER/NAME")
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    images: dict[str, tuple[str, bytes]] = {}  # stem -> (extension, bytes)
    captions: dict[str, str] = {}
    for name, data in files[:MAX_UPLOAD_FILES]:
        path = PurePosixPath(name.replace("\\", "/"))
        stem, ext = path.stem, path.suffix.lower()
        if len(data) > MAX_UPLOAD_BYTES:
            skip("too_large")
        elif ext == ".txt":
            text = decode_caption(data)
            captions[stem] = clean_caption(text) if text is not None else ""
            if text is None:
                skip("unreadable_caption")
        elif ext in IMAGE_EXTENSIONS:
            decoded = decode_image(data)
            if isinstance(decoded, str):
                skip(decoded)
            else:
                images[stem] = (ext, data)
        else:
            skip("not_an_image")
    if len(files) > MAX_UPLOAD_FILES:
        skipped["over_the_file_limit"] = len(files) - MAX_UPLOAD_FILES
    if not images:
        raise DatasetError(f"None of the uploaded files is a usable image (skipped: {skipped or 'none'}).")
    operations, rows = [], []
    for index, (stem, (ext, data)) in enumerate(sorted(images.items())):
        file_name = f"images/{index:04d}{ext}"
        operations.append(CommitOperationAdd(path_in_repo=file_name, path_or_fileobj=data))
        rows.append(json.dumps({"file_name": file_name, "text": captions.get(stem, "")}))
    operations.append(CommitOperationAdd(path_in_repo="metadata.jsonl", path_or_fileobj=("\n".join(rows) + "\n").encode()))
    api = HfApi(token=token)
    with hub_errors(repo_id, repo_type="dataset", token=token, what=f"uploading to {repo_id}", write=True):
        with_retries(lambda: api.create_repo(repo_id, repo_type="dataset", private=True, exist_ok=True, token=token),
                     "create_repo")
        with_retries(lambda: api.create_commit(repo_id, operations, repo_type="dataset", token=token,
                                               commit_message=f"Training images from the sd35hub Space ({len(rows)})"),
                     f"commit to {repo_id}")
    return UploadResult(repo_id, len(rows), sum(1 for s in images if captions.get(s)), skipped)
