"""The Space's training page, minus the UI (space/train_page.py draws it): a visitor's choices -> a job plan
on Hugging Face Jobs with *their* token -> the job -> its progress. Nothing trains on the Space's hardware.

The visitor's token is passed explicitly to every call (never read from or written to the process
environment, which all sessions share) and reaches the job only as its HF_TOKEN secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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
    return [f"{key}={json.dumps(value)}" for key, value in values.items()] + extra


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
